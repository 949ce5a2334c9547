# Every mixture-of-experts family on real gloo ranks: one training step through DeepSpeed's pipeline engine at pp=2
# (fp32 and bf16, and DualPipeV for Mixtral) and at an uneven pp=3, compared with Hugging Face's loss *with* its
# router load-balancing term (output_router_logits=True in every small config) and every parameter after the step.
# The ranks load their stages from what save_pretrained wrote (one tensor per expert on disk). One launch per pp.
import json

import pytest
from conftest import run_recipe

from pptk.models.decoder_families import MOE_FAMILIES
from pptk.verify.compare import BF16_TOLERANCE

pytestmark = pytest.mark.dist

FAMILY_NAMES = sorted(MOE_FAMILIES)
SWITCH = sorted(t for t, family in MOE_FAMILIES.items() if family.moe == "switch")  # those with a router loss
EAGER_ONLY = {"gpt_oss"}  # attention sinks: no SDPA path in transformers
# pp=3: the router sums cross a middle stage, which receives their gradient (pptk.deepspeed_compat's
# separate_receive_buffers); Qwen3-MoE's dense layer 0 sends none from the first stage; DeepSeek-V3 has no router loss
PP3 = FAMILY_NAMES


def _job(model_type, *, model=None, **kwargs):
    from pptk.verify.run import VerifyJob

    attn = "eager" if model_type in EAGER_ONLY else "sdpa"
    return VerifyJob(model or model_type, task="causal-lm", attn_implementation=attn, seq_len=24, **kwargs)


def _verify(tmp_path_factory, name, jobs: dict, *, pp: int, broken=()) -> dict:
    from pptk.verify.run import launch_jobs, prepare_jobs

    work = tmp_path_factory.mktemp(name)
    prepared = dict(zip(jobs, prepare_jobs(list(jobs.values()), pp=pp, work=work)))
    for key in broken:  # the ranks' model drops the router term: the check must fail
        config_file = prepared[key].work / "hf" / "config.json"
        config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"output_router_logits": False}))
    results = dict(zip(prepared, launch_jobs(list(prepared.values()), pp=pp, work=work)))
    return {key: (prepared[key].reference, result) for key, result in results.items()}


@pytest.fixture(scope="module")
def moe_pp2(tmp_path_factory):
    jobs = {
        (precision, name): _job(name, precision=precision) for precision in ("fp32", "bf16") for name in FAMILY_NAMES
    }
    jobs[("dualpipev", "mixtral")] = _job("mixtral", micro_batches=4, schedule="dualpipev")
    jobs[("no-router-term", "qwen2_moe")] = _job("qwen2_moe")
    return _verify(tmp_path_factory, "verify-moe-pp2", jobs, pp=2, broken=[("no-router-term", "qwen2_moe")])


@pytest.fixture(scope="module")
def moe_pp3(tmp_path_factory):
    jobs = {(precision, name): _job(name, precision=precision) for precision in ("fp32", "bf16") for name in PP3}
    return _verify(tmp_path_factory, "verify-moe-pp3", jobs, pp=3)


def assert_fp32_match(result):
    assert result.passed, result.describe()
    assert result.loss_rel_diff <= 1e-5 and result.max_param_diff <= 1e-5, result.describe()
    assert result.params_pipeline == result.params_reference


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_pp2_matches_hugging_face_with_the_router_term_fp32(moe_pp2, model_type):
    _, result = moe_pp2[("fp32", model_type)]
    assert_fp32_match(result)
    assert result.model_type == model_type and result.pp == 2


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_pp2_matches_hugging_face_in_bf16(moe_pp2, model_type):
    _, result = moe_pp2[("bf16", model_type)]
    assert result.passed, result.describe()
    assert result.precision == "bf16" and result.max_param_diff <= BF16_TOLERANCE
    assert result.params_pipeline == result.params_reference


def test_dualpipev_matches_hugging_face_for_mixtral(moe_pp2):
    _, result = moe_pp2[("dualpipev", "mixtral")]
    assert_fp32_match(result)


def test_a_pipeline_without_the_router_term_fails_the_check(moe_pp2):
    """The reference includes Hugging Face's router term and the check sees it: the same model on ranks whose
    config turns output_router_logits off is reported, by its loss and by its routers' gradients."""
    _, result = moe_pp2[("no-router-term", "qwen2_moe")]
    assert not result.passed
    assert result.loss_rel_diff > 1e-4, result.describe()  # coef 0.001 x aux (about top_k = 2) on a loss of ~5.5
    assert any(".mlp.gate." in name for name, _ in result.largest_diffs), result.largest_diffs


@pytest.mark.parametrize("name", PP3)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_uneven_pp3_matches_hugging_face(moe_pp3, name, precision):
    _, result = moe_pp3[(precision, name)]
    if precision == "fp32":
        assert_fp32_match(result)
    else:
        assert result.passed and result.max_param_diff <= BF16_TOLERANCE, result.describe()
    blocks = [sum("DecoderLayerPipe" in layer for layer in stage) for stage in result.stages]
    assert len(blocks) == 3 and all(blocks) and sum(blocks) == 4, result.stages  # a middle stage of experts


def test_the_router_term_is_in_the_reference_loss(moe_pp2):
    """What the pipeline matched includes coef x aux: Hugging Face's loss minus its cross-entropy is the term."""
    for model_type in SWITCH:
        reference, result = moe_pp2[("fp32", model_type)]
        assert reference["loss"] == result.loss_reference
    assert "deepseek_v3" not in SWITCH  # DeepSeek-V3: Hugging Face adds no router loss, nor does pptk


# A recipe run on CPU: the demo corpus on a small Mixtral (4 experts, top-2, router loss on) at pp=2.
MOE_DEMO_ARGS = ["--demo", "--model", "mixtral", "--pp", "2", "--max-steps", "20", "--log-every", "5"]
MOE_DEMO_ARGS += ["--eval-every", "1000", "--save-every", "10", "--micro-batch-size", "2", "--no-dropout"]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe-demo")
    run = run_recipe("gpt_pretrain.py", MOE_DEMO_ARGS, output_dir=out, timeout=400, wandb=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, [r for r in records if "loss" in r]


def test_a_moe_recipe_run_learns(moe_run):
    _, steps = moe_run
    assert [r["step"] for r in steps] == [5, 10, 15, 20]
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5, [r["loss"] for r in steps]  # seen: 8.4 -> 7.5


def test_the_router_loss_is_logged_every_logged_step(moe_run):
    _, steps = moe_run
    # Hugging Face's aux_loss: top_k (2) when balanced, up to top_k x experts / top_k when one expert takes all
    assert all(1.5 < r["router_aux_loss"] < 4.0 for r in steps), [r["router_aux_loss"] for r in steps]


def test_expert_loads_are_logged_per_stage(moe_run):
    _, steps = moe_run
    for r in steps:
        for stage in (0, 1):
            # 2 sequences x 64 tokens x top-2 over 4 experts: 64 tokens per expert per layer on average, exactly
            assert r[f"expert_tokens_mean/stage{stage}"] == pytest.approx(64.0, rel=1e-6)
            ratio = r[f"expert_load_max_over_mean/stage{stage}"]
            assert 1.0 <= ratio <= 2.0 + 1e-6  # 2.0 = experts / top_k: one expert in every token's top-2
            assert r[f"expert_tokens_max/stage{stage}"] == pytest.approx(64.0 * ratio, rel=1e-5)


def test_the_moe_metrics_reach_wandb(moe_run):
    out, _ = moe_run
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    logged = run_file.read_bytes()
    assert b"router_aux_loss" in logged and b"expert_load_max_over_mean/stage1" in logged


def test_a_moe_checkpoint_resumes_on_one_stage_on_the_same_curve(moe_run, tmp_path):
    """The pp=2 run's step-10 checkpoint (fused 3-D experts in the layer files) resumes at pp=1 and logs the losses
    of steps 15 and 20 that the uninterrupted run logged."""
    out, steps = moe_run
    resumed_dir = tmp_path / "resumed"
    args = [
        *MOE_DEMO_ARGS,
        "--pp",
        "1",
        "--global-batch-size",
        "8",
        "--resume-from",
        str(out / "checkpoints" / "step10"),
    ]
    run = run_recipe("gpt_pretrain.py", args, output_dir=resumed_dir, launcher=["--num_gpus", "1"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = [json.loads(line) for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(resumed) == [15, 20]
    for step in (15, 20):
        uninterrupted = next(r["loss"] for r in steps if r["step"] == step)
        assert resumed[step] == pytest.approx(uninterrupted, rel=1e-5), (step, resumed[step], uninterrupted)
