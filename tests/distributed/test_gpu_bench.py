# benchmarks/gpu_bench.py (`make bench-gpu`) where no GPU is: it stops with a clear message, and its --smoke run (2
# CPU ranks, bf16 through BF16_Optimizer, all three runs in one launch) writes the JSON the GPU run writes.
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_bench.py"


def cpu_env() -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def test_without_cuda_it_stops_with_a_message(tmp_path):
    out = tmp_path / "result.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=cpu_env(),
        cwd=ROOT,
    )
    assert run.returncode == 2
    assert "no CUDA device" in run.stderr and "make bench-gpu" in run.stderr
    assert not out.exists()


def test_smoke_run_compares_the_pipeline_with_hugging_face_under_zero1(tmp_path):
    out = tmp_path / "smoke.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--activation-checkpointing", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
        env=cpu_env(),
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] and result["activation_checkpointing"] and result["ds_config"] == "pipe_zero1_bf16.json"
    runs = {r["name"]: r for r in result["runs"]}
    assert list(runs) == ["pptk-pp1", "hf-zero1", "pptk-pp2"]
    assert [(r["pp"], r["dp"]) for r in runs.values()] == [(1, 2), (1, 2), (2, 1)]
    tokens = result["batch"]["tokens_per_step"]
    for r in runs.values():  # the same global batch everywhere
        assert r["micro_batch"] * r["accum"] * r["dp"] * result["model"]["seq_len"] == tokens
        assert r["finite"] and r["tokens_per_s"] > 0 and r["tflops"] > 0
        assert r["mfu"] is None and r["peak_memory_gib"] is None  # no GPU: no peak to compare with, no CUDA memory
        assert r["ratio_to_hf_zero1"] == pytest.approx(r["tokens_per_s"] / runs["hf-zero1"]["tokens_per_s"])
    # the same model and first batch on both sides: the first losses agree (bf16, different kernels' order)
    assert runs["pptk-pp1"]["loss_first"] == pytest.approx(runs["hf-zero1"]["loss_first"], rel=2e-2)
    assert "tokens/s" in run.stdout and "x1.000 of hf-zero1" in run.stdout


def test_model_flops_count_a_1b_llama_as_such():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_bench
    finally:
        sys.path.remove(str(SCRIPT.parent))
    args = gpu_bench.parse_args([])
    config = gpu_bench.llama_config(args)
    from transformers import LlamaForCausalLM

    with __import__("torch").device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert 1.0e9 < params < 1.2e9  # "~1B"
    non_embedding = params - config.vocab_size * config.hidden_size
    attention = 12 * config.num_hidden_layers * config.hidden_size * args.seq_len
    assert gpu_bench.model_flops_per_token(config, args.seq_len) == pytest.approx(6 * non_embedding + attention)
    assert [r.name for r in gpu_bench.plan_runs(1, args)] == ["pptk-pp1", "hf-zero1"]
    assert [r.name for r in gpu_bench.plan_runs(8, args)] == ["pptk-pp1", "hf-zero1", "pptk-pp2"]
