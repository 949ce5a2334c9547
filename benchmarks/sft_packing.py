"""SFT: packed rows vs padded rows on the same chats, measured in one run.

Two launches of `recipes/sft.py` (2 CPU ranks, pp=2, a small LLaMA, the demo's arithmetic chats), one packed (the
default) and one with --no-packing, each for the same number of steps on the same rows' budget. Reported per run:
the padding fraction of the rows, all tokens per second (padding included), and conversation tokens per second
(what the model learns from); the ratio of the latter is what packing buys. Writes
benchmarks/results/sft_packing.json.

    make install && DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sft_packing.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from results_file import ROOT, write_result

VENV_BIN = Path(sys.executable).parent


def _chat_model(work: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pptk.data.demo_chat import demo_chat_tokenizer, demo_conversations

    tokenizer = demo_chat_tokenizer(work / "tokenizer")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo_conversations(2000, seed=1)))
    return work


def _run(work: Path, name: str, extra: list[str], *, steps: int, seq_len: int) -> dict:
    out = work / name
    cmd = [
        str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 1000),
        str(ROOT / "recipes" / "sft.py"), "--output-dir", str(out), "--model", str(work / "model"),
        "--train", str(work / "train.jsonl"), "--seq-len", str(seq_len), "--micro-batch-size", "4",
        "--max-steps", str(steps), "--eval-every", str(10 * steps), "--save-every", str(10 * steps),
        "--log-every", "1", "--wandb-mode", "disabled", *extra,
    ]  # fmt: skip
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    steps_logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in steps_logged if "loss" in r][1:]  # the first step includes the engine's warm-up
    tokens_per_s = sum(r["tokens_per_s"] for r in timed) / len(timed)
    padding = sum(r["padding_fraction"] for r in timed) / len(timed)
    summary = json.loads((out / "summary.json").read_text())
    return {
        "rows_padding_fraction": round(padding, 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "conversation_tokens_per_s": round(tokens_per_s * (1 - padding), 1),
        "supervised_tokens_per_step": round(sum(r["supervised_tokens"] for r in timed) / len(timed), 1),
        "final_loss": summary["last_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "sft_packing.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = _chat_model(Path(tmp))
        packed = _run(work, "packed", [], steps=args.steps, seq_len=args.seq_len)
        padded = _run(work, "padded", ["--no-packing"], steps=args.steps, seq_len=args.seq_len)
    result = {
        "what": "recipes/sft.py, 2 CPU ranks (pp=2), LLaMA 4 x 128, demo arithmetic chats, same steps and rows",
        "seq_len": args.seq_len,
        "steps": args.steps,
        "packed": packed,
        "padded": padded,
        "packed_over_padded_conversation_tokens_per_s": round(
            packed["conversation_tokens_per_s"] / padded["conversation_tokens_per_s"], 2
        ),
    }
    print(json.dumps(result, indent=2))
    write_result(args.output, result)


if __name__ == "__main__":
    main()
