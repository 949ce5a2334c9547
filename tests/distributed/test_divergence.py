# A blown-up run through the real `deepspeed` launcher: its weights are never saved, and it ends in one error line.
import pytest
import torch
from conftest import run_recipe

pytestmark = pytest.mark.dist
QUICK = ["--demo", "--log-every", "1", "--eval-every", "1000", "--wandb-mode", "disabled", "--micro-batch-size", "2"]


def _largest_weight(tag_dir) -> float:
    return max(t.abs().max().item() for p in tag_dir.glob("layer_*") for t in torch.load(p).values())


def test_a_learning_rate_of_1e30_is_never_saved_and_the_run_ends_diverged(tmp_path):
    """--lr 1e30, saving every step: once the warmup's first non-zero learning rate is applied, the weights reach
    ~1e31 while that step's loss (measured before its update) is still fine. Their norm jumped by orders of magnitude,
    so that save is refused, a bad step; DeepSpeed skips every later update (non-finite gradients), bad steps too,
    so no later save happens either. The streak stays under --max-bad-steps 4, so the run reaches its last step,
    whose save was refused: it must not exit 0 with a summary, but end in one line naming what latest holds."""
    out = tmp_path / "lr-1e30"
    args = [*QUICK, "--lr", "1e30", "--max-steps", "5", "--save-every", "1", "--max-bad-steps", "4"]
    run = run_recipe("gpt_pretrain.py", args, output_dir=out, timeout=300)
    text = run.stdout + run.stderr
    assert run.returncode == 2, text[-3000:]
    errors = [line for line in text.splitlines() if "gpt_pretrain: error:" in line]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert "rank 0: the run diverged: its last step 5 was not saved (DeepSpeed skipped its update" in errors[0]
    assert "rank 1: stopping: another rank failed" in text
    assert "the weights' norm jumped" in text and "DeepSpeed skipped the update" in text
    assert "== pptk summary ==" not in text and not (out / "summary.json").exists()
    ckpt = out / "checkpoints"
    saved = sorted(int(p.name.removeprefix("step")) for p in ckpt.glob("step*"))
    latest = (ckpt / "latest").read_text().strip()
    assert latest == f"step{saved[-1]}" and saved[-1] < 5, saved
    assert f"{ckpt / 'latest'} holds {latest}, the last good weights" in errors[0]
    first = _largest_weight(ckpt / "step1")
    assert all(_largest_weight(ckpt / f"step{s}") < 2 * first for s in saved), "a blown-up state was saved"
