# Checkpoints written by an earlier pptk keep resuming: a fixture saved by pptk 0.1.0 continues its loss curve.
import json
import shutil
from pathlib import Path

import pytest
from conftest import free_port, run_recipe

pytestmark = pytest.mark.dist
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v0"


def test_a_checkpoint_from_pptk_0_1_0_resumes_with_the_same_losses(tmp_path):
    """Resumed at pp=1 (the layout-change path: layer files, per-layer optimizer states and the manifest)."""
    expected = json.loads((FIXTURE / "expected.json").read_text())
    for name in ("model", "data.txt", "checkpoints"):  # the recipe writes next to its inputs; keep the fixture clean
        (shutil.copytree if (FIXTURE / name).is_dir() else shutil.copy)(FIXTURE / name, tmp_path / name)
    args = [a.format(fixture=tmp_path) for a in expected["resume_args"]]
    run = run_recipe(
        "gpt_pretrain.py",
        [
            *args,
            "--pp",
            "1",
            "--log-every",
            "1",
            "--eval-every",
            "1000",
            "--save-every",
            "1000",
            "--wandb-mode",
            "disabled",
            "--resume-from",
            str(tmp_path / "checkpoints"),
        ],
        output_dir=tmp_path / "run",
        launcher=["--num_gpus", "1", "--master_port", str(free_port())],
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {str(r["step"]): r["loss"] for r in records if "loss" in r}
    assert losses == pytest.approx(expected["losses"], rel=1e-6), (losses, expected["losses"])
