# Every decoder family on real gloo ranks: one training step through DeepSpeed's pipeline engine at pp=2 and at an
# uneven pp=3, compared with Hugging Face (loss and every parameter after an lr=1 SGD step). pp=2 runs in the
# session's shared launches (conftest.verified_pp2, conftest.verified_pp3).
import pytest

from pptk.models.decoder_families import FAMILIES

pytestmark = pytest.mark.dist

FAMILY_NAMES = sorted(FAMILIES)


@pytest.fixture(scope="module")
def pp2(verified_pp2):
    return {name: verified_pp2[("decoder", name)] for name in FAMILY_NAMES}


@pytest.fixture(scope="module")
def pp3(verified_pp3):
    return {name: verified_pp3[("decoder", name)] for name in FAMILY_NAMES}


def assert_matches_hugging_face(result):
    assert result.passed, result.describe()
    assert result.loss_rel_diff <= 1e-5 and result.max_param_diff <= 1e-5, result.describe()
    assert result.params_pipeline == result.params_reference


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_pp2_matches_hugging_face(pp2, model_type):
    result = pp2[model_type]
    assert_matches_hugging_face(result)
    assert result.model_type == model_type and result.pp == 2
    assert result.stages[0][0] == "0:DecoderEmbeddingPipe"
    last = result.stages[1][-1]
    tied = FAMILIES[model_type].small.get("tie_word_embeddings")
    if not FAMILIES[model_type].logits:
        # a tied head is a second copy of the embedding on the last stage, kept equal by DeepSpeed's tied all-reduce
        assert last.endswith("DecoderEmbeddingPipe" if tied else "LMHeadPipe"), result.stages


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_uneven_pp3_matches_hugging_face(pp3, model_type):
    result = pp3[model_type]
    assert_matches_hugging_face(result)
    blocks = [sum("DecoderLayerPipe" in name for name in stage) for stage in result.stages]
    assert blocks == [1, 2, 1], result.stages  # 4 blocks over 3 stages: the middle stage holds two
    assert all(n > 0 for n in result.params_per_stage)
