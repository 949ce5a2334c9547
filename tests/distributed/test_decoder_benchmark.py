# benchmarks/gpu_llama_bf16.py where no GPU is: it stops with a clear message, and its --smoke run (2 CPU ranks through
# the deepspeed launcher, the same code path as on GPUs) trains and writes its JSON.
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_llama_bf16.py"
VENV_BIN = Path(sys.executable).parent


def cpu_env() -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def test_without_cuda_it_stops_with_a_message(tmp_path):
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--output", str(out)], capture_output=True, text=True,
                         timeout=120, env=cpu_env(), cwd=ROOT)
    assert run.returncode == 2
    assert "no CUDA device" in run.stderr and "deepspeed --num_gpus 2 benchmarks/gpu_llama_bf16.py" in run.stderr
    assert not out.exists()


def test_smoke_run_through_the_deepspeed_launcher(tmp_path):
    from pptk.launch import free_port

    out = tmp_path / "smoke.json"
    run = subprocess.run([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                          str(SCRIPT), "--smoke", "--output", str(out)],
                         capture_output=True, text=True, timeout=300, env=cpu_env(), cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] and result["precision"] == "fp32"
    assert result["layout"].startswith("pp(2) x dp(1)")
    assert [s["blocks"] for s in result["stages"]] == [2, 2]
    assert result["tokens_per_s"] > 0 and len(result["peak_memory_gib_per_rank"]) == 2
    assert result["model"]["parameters"] > 0
    assert result["loss_last"] < result["loss_first"]  # it trained: 5 AdamW steps on a repeating batch cycle
