"""Pipeline efficiency: the same model and global batch at pp=1 and pp>1, for 1f1b and dualpipev, each with the
compute (FLOP) and the profile (measured) partition; efficiency = throughput_pp / (pp x throughput_pp1), printed
next to the schedule's ideal (pptk.parallel.schedules.ideal_efficiency) and the measured breakdown (training.observe).

Every configuration is a real `deepspeed` launch of recipes/gpt_pretrain.py on the embedded demo text and tokenizer
with a GPT-2 of --layers x --hidden (default 8 x 384, sequence 128: the model the issue measured; the demo's own
4 x 128 model is too small for its compute to outweigh the per-message costs) on CPU ranks, 1 thread each; repeats
are interleaved (config A, B, ... then again) so machine noise hits all alike, and the
median of the last logged window (warm-up excluded) is kept. Writes benchmarks/results/pipeline_efficiency.json.

    make install && DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pipeline_efficiency.py
    ... --pp 1 2 4 --repeats 3       # pp=4 needs 4 free cores to mean anything
    ... --quick                      # a smoke run (2 steps a window, 1 repeat): checks the script, not the numbers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from results_file import write_result

from pptk.launch.ranks import free_port
from pptk.parallel.schedules import ideal_efficiency

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pp", type=int, nargs="+", default=[1, 2], help="pipeline sizes (1 is the baseline)")
    p.add_argument("--schedules", nargs="+", default=["1f1b", "dualpipev"])
    p.add_argument("--methods", nargs="+", default=["compute", "profile"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=8, help="per step (so the global batch is fixed)")
    p.add_argument("--window", type=int, default=6, help="timed steps after one warm-up window")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--output", type=Path, default=RESULTS / "pipeline_efficiency.json")
    return p.parse_args()


def configs(args: argparse.Namespace) -> list[tuple[int, str, str]]:
    out = [(1, "1f1b", "compute")] if 1 in args.pp else []
    for pp in (p for p in args.pp if p > 1):
        out += [(pp, s, m) for s in args.schedules for m in args.methods]
    return out


def prepare_inputs(args: argparse.Namespace, work: Path) -> list[str]:
    """A GPT-2 config of the chosen size, the demo corpus as a text file and the demo tokenizer: the recipe's
    --model/--data/--tokenizer flags."""
    from transformers import GPT2Config

    from pptk.data.demo import demo_corpus, train_demo_tokenizer

    tokenizer = train_demo_tokenizer(text=demo_corpus(), vocab_size=4096, out_dir=work / "tokenizer")
    heads = max(1, args.hidden // 64)
    GPT2Config(
        vocab_size=4096, n_positions=args.seq_len, n_embd=args.hidden, n_layer=args.layers, n_head=heads,
        bos_token_id=0, eos_token_id=0,
    ).save_pretrained(work / "model")  # fmt: skip
    (work / "corpus.txt").write_text(demo_corpus())
    return ["--model", str(work / "model" / "config.json"), "--tokenizer", str(tokenizer),
            "--data", str(work / "corpus.txt"), "--seq-len", str(args.seq_len)]  # fmt: skip


def launch(config: tuple[int, str, str], args: argparse.Namespace, work: Path, inputs: list[str]) -> dict:
    """One run; the last logged record (the steady-state window) plus its measured pipeline metrics."""
    pp, schedule, method = config
    out = work / f"pp{pp}-{schedule}-{method}"
    steps = 2 * args.window
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus", str(pp), "--master_port", str(free_port()),
        str(ROOT / "recipes" / "gpt_pretrain.py"), *inputs, "--output-dir", str(out),
        "--pp", str(pp), "--schedule", schedule, "--partition-method", method,
        "--micro-batch-size", str(args.micro_batch_size), "--grad-accum-steps", str(args.micro_batches),
        "--max-steps", str(steps), "--log-every", str(args.window), "--eval-every", str(10 * steps),
        "--save-every", str(10 * steps), "--wandb-mode", "disabled", "--no-dropout",
    ]  # fmt: skip
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "tokens_per_s" in r][-1]


def main() -> None:
    args = parse_args()
    if args.quick:
        args.window, args.repeats = 2, 1
    runs = configs(args)
    samples: dict[tuple, list[dict]] = {c: [] for c in runs}
    with tempfile.TemporaryDirectory(prefix="pptk-bench-") as tmp:
        inputs = prepare_inputs(args, Path(tmp))
        for repeat in range(args.repeats):
            for config in runs:
                samples[config].append(launch(config, args, Path(tmp) / f"r{repeat}", inputs))
                print(f"repeat {repeat}: pp={config[0]} {config[1]:9s} {config[2]:8s} "
                      f"{samples[config][-1]['tokens_per_s']:.0f} tokens/s", flush=True)  # fmt: skip
    baseline = (
        statistics.median(r["tokens_per_s"] for r in samples.get((1, "1f1b", "compute"), [])) if 1 in args.pp else None
    )
    rows = []
    for (pp, schedule, method), records in samples.items():
        tput = statistics.median(r["tokens_per_s"] for r in records)
        mid = sorted(records, key=lambda r: r["tokens_per_s"])[len(records) // 2]
        row = {
            "pp": pp, "schedule": schedule, "partition": method, "tokens_per_s": tput,
            "efficiency": tput / (pp * baseline) if baseline else None,
            "ideal": ideal_efficiency(schedule, pp=pp, micro_batches=args.micro_batches),
            "measured_bubble": mid.get("pipe/bubble"), "imbalance": mid.get("pipe/imbalance"),
            "breakdown_ms": {k.removeprefix("pipe/"): v for k, v in mid.items() if k.startswith("pipe/stage")},
        }  # fmt: skip
        rows.append(row)
        eff = f"{row['efficiency']:.3f}" if row["efficiency"] is not None else "  -  "
        print(f"pp={pp} {schedule:9s} {method:8s} {tput:8.0f} tok/s  efficiency {eff}  ideal {row['ideal']:.3f}  "
              f"bubble {row['measured_bubble'] or 0:.3f}  imbalance {row['imbalance'] or 1:.2f}")  # fmt: skip
    result = {
        "benchmark": "pipeline_efficiency",
        "what_ran": f"pp {args.pp} on {os.cpu_count()} CPU cores, 1 thread per rank; GPT-2 {args.layers} x "
        f"{args.hidden}, sequence {args.seq_len}, demo text; "
        f"global batch {args.micro_batch_size} x {args.micro_batches}; {args.repeats} interleaved repeats of "
        f"{args.window} timed steps" + (" (--quick: a smoke run, not a measurement)" if args.quick else ""),
        "platform": platform.platform(),
        "load_average_at_end": os.getloadavg(),
        "rows": rows,
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
