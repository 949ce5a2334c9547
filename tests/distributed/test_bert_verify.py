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
    """Both sides initialise a tensor the checkpoint lacks alike, so parity alone would PASS on it."""
    strict = verified_pp2[("minilm-strict", "masked-lm")]
    assert not strict.passed
    problem = " ".join(strict.problems)
    assert "missing from the checkpoint: cls.predictions" in problem and "--allow-missing" in problem
    assert "unexpected in the checkpoint" in problem  # MiniLM's pooler, which BertForMaskedLM has no place for
    assert verified_pp2[("minilm", "masked-lm")].passed  # the same job with allow_missing=True
