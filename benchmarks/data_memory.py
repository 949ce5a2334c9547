# Per-rank memory of training from a prepared set does not grow with the corpus: >= 1 GB of generated text, pp=2,
# in pptk's format and in Megatron-LM's.
"""Measures, within one run:

1. ``pptk data prepare`` throughput (tokens/s) at 1 and 2 workers on the same slice of generated text;
2. a prepared set from >= --gigabytes of generated text (documents of random words from the demo corpus);
3. each rank's RSS growth (VmRSS before the trainer, VmHWM at its end) while training a few steps at pp=2 from the
   large set, minus the same for a tiny set: the memory the data costs. It must stay under 100 MB while the token
   file is at least 20x larger;
4. the same with both sets given as Megatron indexed datasets (PREFIX.bin + PREFIX.idx, no pptk manifest, so read
   and checked as a set made by Megatron-LM is): the token file is linked, the .idx written from the document
   offsets by pptk.data.megatron.write_index.

    .venv/bin/python benchmarks/data_memory.py [--gigabytes 1.0] [--steps 4] [--out FILE]

Writes benchmarks/results/data_memory.json (repository-relative paths only), or --out. Slow on 2 CPU cores
(tokenizing 1 GB takes a while); ``--gigabytes 0.05 --out /tmp/smoke.json`` is a quick smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "data_memory.json"


def write_corpus(path: Path, *, target_bytes: int, seed: int = 0) -> int:
    """One document per line, 50-400 words each drawn from the demo corpus's vocabulary; streamed to disk."""
    from pptk.data.demo import demo_corpus

    words = np.array(sorted(set(demo_corpus().split()))[:20000])
    rng = np.random.default_rng(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            lines = [" ".join(words[rng.integers(0, len(words), rng.integers(50, 400))]) for _ in range(2000)]
            chunk = "\n".join(lines) + "\n"
            f.write(chunk)
            written += len(chunk.encode())
    return written


def kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def train_rank(rank: int, model_dir: str, data_dir: str, out_dir: str, steps: int) -> None:
    from pptk.tasks import causal_lm
    from pptk.training.config import ModelConfig, OptimConfig, OutputConfig, ParallelConfig, RunConfig
    from pptk.training.trainer import Trainer

    before = kib("VmRSS")
    run = RunConfig(
        model=ModelConfig(model=model_dir, tokenizer=Path(model_dir), dropout=False),
        data=causal_lm.CausalLMData(files=(Path(data_dir),), seq_len=64, eval_fraction=0.001),
        output=OutputConfig(
            output_dir=Path(out_dir), log_every=1, eval_every=10**6, save_every=10**6, wandb_mode="disabled"
        ),
        parallel=ParallelConfig(pp=2, micro_batch_size=4, grad_accum_steps=4),
        optim=OptimConfig(max_steps=steps, warmup_steps=1),
    )
    Trainer(run, causal_lm.prepare).fit()
    peak = kib("VmHWM")
    (Path(out_dir) / f"rss_rank{rank}.json").write_text(json.dumps({"before_kib": before, "peak_kib": peak}))


def train(model_dir: Path, data_dir: Path, out_dir: Path, steps: int) -> list[int]:
    """Each rank's RSS growth in bytes (peak during training minus before)."""
    from pptk.launch.ranks import run_ranks

    out_dir.mkdir(parents=True)
    run_ranks(
        train_rank,
        world_size=2,
        args=(str(model_dir), str(data_dir), str(out_dir), steps),
        log_dir=out_dir / "logs",
        timeout_s=3600,
    )
    rows = [json.loads((out_dir / f"rss_rank{r}.json").read_text()) for r in range(2)]
    return [(row["peak_kib"] - row["before_kib"]) * 1024 for row in rows]


def as_megatron(prepared_dir: Path, prefix: Path) -> Path:
    """The prepared set as a Megatron indexed dataset: the same token bytes, Megatron's index of its documents."""
    from pptk.data.megatron import CODES, write_index

    manifest = json.loads((prepared_dir / "manifest.json").read_text())
    if manifest["dtype"] not in CODES:
        raise SystemExit(f"a {manifest['dtype']} token file has no Megatron dtype code; use a smaller vocabulary")
    try:
        os.link(prepared_dir / "tokens.bin", f"{prefix}.bin")
    except OSError:
        shutil.copyfile(prepared_dir / "tokens.bin", f"{prefix}.bin")
    offsets = np.memmap(prepared_dir / "documents.idx", dtype=np.int64, mode="r")
    write_index(Path(f"{prefix}.idx"), offsets, manifest["dtype"])
    return prefix


def growth_summary(tiny_growth: list[int], big_growth: list[int], token_file: int) -> dict:
    from_data = [b - t for b, t in zip(big_growth, tiny_growth)]
    return {
        "rss_growth_bytes_per_rank": {"tiny_set": tiny_growth, "large_set": big_growth, "from_data": from_data},
        "token_file_over_worst_rank_growth": token_file / max(*from_data, 1),
        "passed": max(from_data) < 100 * 2**20 and token_file >= 20 * max(from_data),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--speed-megabytes", type=float, default=50.0, help="text for the 1- vs 2-worker timing")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results go (JSON)")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers import AutoTokenizer, GPT2Config

    from pptk.data.demo import demo_corpus, train_demo_tokenizer
    from pptk.data.prepare import prepare_files

    with tempfile.TemporaryDirectory(prefix="pptk-data-memory-") as tmp:
        work = Path(tmp)
        model_dir = train_demo_tokenizer(text=demo_corpus(), vocab_size=4096, out_dir=work / "model")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        GPT2Config(
            vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
        ).save_pretrained(model_dir)
        small_text, big_text = work / "small.txt", work / "big.txt"
        write_corpus(small_text, target_bytes=int(args.speed_megabytes * 1e6))
        speed = {}
        for workers in (1, 2):
            began = time.perf_counter()
            prepared = prepare_files(
                [small_text],
                tokenizer=tokenizer,
                out=work / f"speed{workers}",
                workers=workers,
                lines_are_documents=True,
            )
            speed[workers] = prepared.manifest["num_tokens"] / (time.perf_counter() - began)
        text_bytes = write_corpus(big_text, target_bytes=int(args.gigabytes * 1e9), seed=1)
        began = time.perf_counter()
        big = prepare_files([big_text], tokenizer=tokenizer, out=work / "big", workers=2, lines_are_documents=True)
        prepare_s = time.perf_counter() - began
        big_text.unlink()
        tiny = prepare_files([small_text], tokenizer=tokenizer, out=work / "tiny", lines_are_documents=True)
        tiny_growth = train(model_dir, tiny.path, work / "run-tiny", args.steps)
        big_growth = train(model_dir, big.path, work / "run-big", args.steps)
        token_file = (big.path / "tokens.bin").stat().st_size
        pptk_format = growth_summary(tiny_growth, big_growth, token_file)
        tiny_megatron = as_megatron(tiny.path, work / "tiny_text_document")
        big_megatron = as_megatron(big.path, work / "big_text_document")
        megatron = growth_summary(
            train(model_dir, tiny_megatron, work / "run-tiny-megatron", args.steps),
            train(model_dir, big_megatron, work / "run-big-megatron", args.steps),
            token_file,
        )
        result = {
            "text_bytes": text_bytes,
            "token_file_bytes": token_file,
            "tokens": big.manifest["num_tokens"],
            "documents": big.manifest["num_documents"],
            "prepare_seconds_2_workers": prepare_s,
            "prepare_tokens_per_s": {"1_worker": speed[1], "2_workers": speed[2]},
            **pptk_format,
            "megatron_format": megatron,
            "passed": pptk_format["passed"] and megatron["passed"],
            "command": "python benchmarks/data_memory.py " + f"--gigabytes {args.gigabytes} --steps {args.steps}",
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
