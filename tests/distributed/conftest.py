# Shared launches for the distributed tier: a recipe run through the real deepspeed launcher is started once per
# session and read by every test that needs it.
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
DEMO_ARGS = ["--demo", "--max-steps", "40", "--log-every", "5", "--eval-every", "20", "--save-every", "20"]


def free_port() -> int:
    from pptk.launch import free_port as pick

    return pick()


def recipe_env() -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline")


def run_recipe(recipe: str, args: list[str], *, output_dir: Path, launcher: list[str] | None = None,
               timeout: int = 400) -> subprocess.CompletedProcess:
    """`deepspeed [launcher args] recipes/<recipe> --output-dir DIR args...`, as a user runs it."""
    launcher = launcher if launcher is not None else ["--num_gpus", "2", "--master_port", str(free_port())]
    cmd = [str(VENV_BIN / "deepspeed"), *launcher, str(ROOT / "recipes" / recipe),
           "--output-dir", str(output_dir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=recipe_env())


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The embedded default on one node: 2 CPU ranks, pp=2, 40 steps."""
    out_dir = tmp_path_factory.mktemp("demo")
    run = run_recipe("gpt_pretrain.py", DEMO_ARGS, output_dir=out_dir)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out_dir, run.stdout
