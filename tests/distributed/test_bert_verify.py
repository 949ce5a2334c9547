# BERT through the real pipeline engine: every task, and the real MiniLM weights, equal Hugging Face at pp=2 and pp=3.
# Both run in the session's shared launches (conftest.verified_pp2, conftest.verified_pp3).
from __future__ import annotations

import pytest
from conftest import BERT_TASKS as TASKS

pytestmark = pytest.mark.dist

# the real-weight job per world size: the tied decoder across stages at pp=2, the pretrained pooler at pp=3
REAL_TASK = {2: "masked-lm", 3: "sequence-classification"}


@pytest.fixture(scope="module", params=[2, 3], ids=lambda pp: f"pp{pp}")
def verified(request):
    pp = request.param
    shared = request.getfixturevalue(f"verified_pp{pp}")
    return pp, {
        ("small" if group == "bert" else "minilm", task): result
        for (group, task), result in shared.items()
        if group in ("bert", "minilm")
    }


@pytest.mark.parametrize("key", [("small", task) for task in TASKS] + [("minilm", "real")], ids="-".join)
def test_pipeline_step_equals_hugging_face(verified, key):
    pp, results = verified
    if key == ("minilm", "real"):
        key = ("minilm", REAL_TASK[pp])
    result = results[key]
    assert result.passed, result.describe()
    assert result.pp == pp and len(result.params_per_stage) == pp and all(result.params_per_stage)
    assert result.params_pipeline == result.params_reference
    assert result.loss_rel_diff <= 1e-5 and result.max_param_diff <= 1e-5
    # the embeddings, token types included, sit on stage 0; only the protocol's three tensors cross a boundary
    assert any(name.endswith("BertEmbeddingsPipe") for name in result.stages[0])
    assert not any("Embeddings" in name for stage in result.stages[1:] for name in stage)
    if key[0] == "minilm":
        assert result.params_reference > 20_000_000  # the real 22.7M-parameter MiniLM, not the small config


def test_verify_fails_on_a_checkpoint_that_lacks_tensors_unless_allowed(verified_pp2):
    """Both sides initialise a tensor the checkpoint lacks alike, so parity alone would PASS on it. MiniLM is a base
    BertModel: its missing MLM head is expected (listed as freshly initialised, as Hugging Face warns), but its pooler,
    which BertForMaskedLM has no place for, is a gap verify still reports unless --allow-missing."""
    strict = verified_pp2[("minilm-strict", "masked-lm")]
    assert not strict.passed
    assert strict.problems == [
        "2 tensor(s) unexpected in the checkpoint: pooler.dense.bias, pooler.dense.weight (pass --allow-missing when "
        "that is expected)"
    ]
    assert strict.fresh_heads == [
        "cls.predictions.bias",
        "cls.predictions.decoder.bias",  # Hugging Face's name for the same tensor (tied)
        "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.dense.weight",
    ]
    assert "freshly initialised (the checkpoint has no masked-lm head" in strict.describe()
    assert verified_pp2[("minilm", "masked-lm")].passed  # the same job with allow_missing=True


def test_a_classifier_on_the_base_minilm_names_its_fresh_head(verified_pp3):
    result = verified_pp3[("minilm", "sequence-classification")]
    assert result.passed, result.describe()
    assert result.fresh_heads == ["classifier.bias", "classifier.weight"] and result.dropped_heads == []
