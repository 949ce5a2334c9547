# Tensor parallelism against Hugging Face: one launch of 4 gloo ranks (pp=2 x tp=2) checks every job below.
import pytest

JOBS = {  # name -> (model, precision)
    "gpt2": ("gpt2", "fp32"),  # tied embedding / LM head across the stages; c_attn's fused q|k|v split per head
    "llama": ("llama", "fp32"),  # grouped-query attention: 4 heads and 2 key/value heads, one of each pair per rank
    "llama-bf16": ("llama", "bf16"),
}


@pytest.fixture(scope="module")
def verified_tp2(tmp_path_factory):
    from pptk.verify import VerifyJob, verify_many

    jobs = [VerifyJob(model, precision=precision, seq_len=24) for model, precision in JOBS.values()]
    work = tmp_path_factory.mktemp("verify-tp2")
    return dict(zip(JOBS, verify_many(jobs, pp=2, tp=2, workdir=work)))


@pytest.mark.parametrize("name", list(JOBS))
def test_pp2_tp2_matches_hugging_face(verified_tp2, name):
    result = verified_tp2[name]
    assert result.passed, result.describe()
    assert (result.pp, result.tp, result.precision) == (2, 2, JOBS[name][1])
    assert result.params_pipeline == result.params_reference


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_each_tp_rank_holds_a_slice(verified_tp2, name):
    """Ranks 2s and 2s+1 are the two tp ranks of stage s: each holds less than the stage, together more (the
    replicated embeddings and norms)."""
    result = verified_tp2[name]
    held = result.params_per_rank
    assert len(held) == 4 and held[0] == held[1] and held[2] == held[3]
    for stage, total in enumerate(result.params_per_stage):
        assert held[2 * stage] < total < 2 * held[2 * stage]
