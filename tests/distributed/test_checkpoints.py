# Checkpoints through the recipe: exact resume (fp32), a save killed midway, resume on other layouts and the HF
# export (bf16, the GPU config, on CPU ranks).
import json
import math
import os

import pytest
import torch
from conftest import DEMO_ARGS, free_port, run_recipe
from transformers import AutoModelForCausalLM

from pptk.checkpoints.convert import load_sequential_from_checkpoint
from pptk.checkpoints.training import find_checkpoint
from pptk.training.ds_config import cpu_supports

pytestmark = pytest.mark.dist
# The layout tests train LLaMA (untied head, rotary tables rebuilt per stage) through the GPT recipe with the shipped
# bf16 config, the one GPUs use: DeepSpeed's BF16_Optimizer with fp32 gradient accumulation, on CPU ranks.
LAYOUT_ARGS = [
    "--demo",
    "--model",
    "llama",
    "--ds-config",
    "ds_configs/pipe_zero1_bf16.json",
    "--max-steps",
    "8",
    "--save-every",
    "4",
    "--log-every",
    "1",
    "--eval-every",
    "1000",
    "--wandb-mode",
    "disabled",
    "--no-dropout",
    "--global-batch-size",
    "16",
    "--seq-len",
    "32",
]
# After a resume on another layout the weights and optimizer state are exact; only the order of the fp32 gradient
# reductions changes, and a bf16 weight next to a rounding boundary may then round the other way.
BF16_CURVE_REL = 2e-4


def _losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_exact_resume_reproduces_the_uninterrupted_losses(demo_run, tmp_path):
    """Dropout on, fp32, CPU: data order, lr schedule, RNG and optimizer state all restored -> identical losses."""
    first_dir, _ = demo_run
    run = run_recipe(
        "gpt_pretrain.py", [*DEMO_ARGS, "--resume-from", str(first_dir / "checkpoints" / "step20")], output_dir=tmp_path
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    uninterrupted, resumed = _losses(first_dir), _losses(tmp_path)
    assert sorted(resumed) == [25, 30, 35, 40]
    assert all(resumed[s] == uninterrupted[s] for s in resumed), (uninterrupted, resumed)


def test_exported_model_loads_in_transformers_and_matches_the_pipeline(demo_run):
    out_dir, _ = demo_run
    exported = AutoModelForCausalLM.from_pretrained(out_dir / "hf").eval()
    _, pipeline = load_sequential_from_checkpoint(out_dir / "checkpoints")
    ids = torch.randint(0, exported.config.vocab_size, (2, 16))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(
        exported(input_ids=ids, attention_mask=mask).logits, pipeline.eval()((ids, mask)), rtol=0, atol=1e-5
    )
    assert (out_dir / "hf" / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def killed_during_save(tmp_path_factory):
    """pp=2 x dp=1 for 8 steps in bf16, saving at 4 and 8; step 3's loss is NaN (DeepSpeed skips its update, pptk
    counts a bad step and goes on); rank 1 is SIGKILLed in the middle of the step-8 save."""
    out_dir = tmp_path_factory.mktemp("killed")
    os.environ["PPTK_FAILPOINT"] = "save:1:8,nanloss:*:3"
    try:
        run = run_recipe("gpt_pretrain.py", LAYOUT_ARGS, output_dir=out_dir)
    finally:
        del os.environ["PPTK_FAILPOINT"]
    return out_dir, run


def test_a_killed_save_leaves_the_previous_checkpoint_intact(killed_during_save):
    out_dir, run = killed_during_save
    assert run.returncode != 0, "the launcher must report the killed rank"
    assert "rank 0: stopping: rank 1 failed (its error is above; if it printed none, it was killed" in run.stderr
    ckpt = out_dir / "checkpoints"
    assert (ckpt / "latest").read_text() == "step4"
    assert (ckpt / "step8.partial").is_dir() and not (ckpt / "step8").exists()
    assert find_checkpoint(ckpt).name == "step4"
    assert sorted(_losses(out_dir)) == list(range(1, 9)), "training itself reached step 8"


def test_bf16_trains_on_cpu_ranks_with_the_shipped_config_and_says_when_it_is_slow(killed_during_save):
    """The slow-bf16 warning appears exactly when this CPU lacks bf16 instructions (CI machines differ)."""
    out_dir, run = killed_during_save
    manifest = json.loads((out_dir / "checkpoints" / "step4" / "pptk.json").read_text())
    assert manifest["optimizer_wrapper"] == "BF16_Optimizer"
    block = torch.load(out_dir / "checkpoints" / "step4" / "layer_01-model_states.pt")
    assert {t.dtype for t in block.values() if t.is_floating_point()} == {torch.bfloat16}
    losses = _losses(out_dir)
    assert losses[8] < losses[1] - 0.1, losses
    warned = "bf16 on CPU ranks runs through DeepSpeed's BF16_Optimizer" in run.stderr
    assert warned == (not cpu_supports("bf16")), run.stderr


def test_a_nan_loss_whose_update_deepspeed_skipped_is_one_bad_step_not_the_end(killed_during_save):
    """BF16_Optimizer's check_grad_overflow (DeepSpeed's default) skipped step 3's update: the weights stayed finite,
    the step counted as bad and training went on (test_optimizer_wrappers checks which wrappers skip)."""
    out_dir, run = killed_during_save
    losses = _losses(out_dir)
    assert math.isnan(losses[3]) and all(math.isfinite(losses[s]) for s in (1, 2, 4, 5, 6, 7, 8)), losses
    assert "step 3: loss nan; DeepSpeed skipped the update" in run.stdout + run.stderr
    block = torch.load(out_dir / "checkpoints" / "step4" / "layer_01-model_states.pt")
    assert all(bool(t.isfinite().all()) for t in block.values() if t.is_floating_point())


def _resume(base_dir, tmp_path, layout: list[str], extra: list[str] = ()):
    world = {"1": 1, "2": 4}[layout[1]]
    port_args = ["--num_gpus", str(world), "--master_port", str(free_port())]
    run = run_recipe(
        "gpt_pretrain.py",
        LAYOUT_ARGS + layout + list(extra) + ["--resume-from", str(base_dir)],
        output_dir=tmp_path,
        launcher=port_args,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return _losses(tmp_path)


def _check_export(out_dir):
    """--export-hf of a bf16 run: bf16 tensors, a config that says so, and the pipeline's outputs."""
    exported = AutoModelForCausalLM.from_pretrained(out_dir / "hf")
    assert type(exported).__name__ == "LlamaForCausalLM" and not exported.config.tie_word_embeddings
    assert next(exported.parameters()).dtype == torch.bfloat16
    exported = exported.float().eval()
    _, pipeline = load_sequential_from_checkpoint(out_dir / "checkpoints")
    ids = torch.randint(0, exported.config.vocab_size, (2, 16))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(
        exported(input_ids=ids, attention_mask=mask).logits, pipeline.eval()((ids, mask)), rtol=0, atol=1e-5
    )


@pytest.fixture(scope="module")
def resumed_at_pp1(killed_during_save, tmp_path_factory):
    """pp=2 -> pp=1: layers move between stages; saves at 6 and 8 for the next hop."""
    base_dir, _ = killed_during_save
    out_dir = tmp_path_factory.mktemp("pp1")
    return out_dir, _resume(base_dir / "checkpoints", out_dir, ["--pp", "1"], ["--save-every", "2"])


def test_bf16_resume_from_pp2_at_pp1_continues_the_curve(killed_during_save, resumed_at_pp1):
    base = _losses(killed_during_save[0])
    out_dir, resumed = resumed_at_pp1
    assert sorted(resumed) == list(range(5, 9))
    for step, loss in resumed.items():
        assert loss == pytest.approx(base[step], rel=BF16_CURVE_REL), (step, base[step], loss)
    _check_export(out_dir)


def test_bf16_resume_from_pp1_at_pp2_x_dp2_continues_the_curve(killed_during_save, resumed_at_pp1, tmp_path):
    """pp=1 -> pp=2 x dp=2: the stages split again and BF16_Optimizer re-shards its fp32 state over 2 replicas."""
    base = _losses(killed_during_save[0])
    resumed = _resume(resumed_at_pp1[0] / "checkpoints" / "step6", tmp_path, ["--pp", "2"])
    assert sorted(resumed) == [7, 8]
    for step, loss in resumed.items():
        assert loss == pytest.approx(base[step], rel=BF16_CURVE_REL), (step, base[step], loss)
    _check_export(tmp_path)
