# The training loop every recipe shares: flags, engine set-up, logging (metrics.jsonl, W&B, progress), checkpoints.
from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from pptk.checkpoint import save_checkpoint
from pptk.ds_config import fill_ds_config, load_ds_config, validate_ds_config
from pptk.errors import PptkError
from pptk.parallel import Layout
from pptk.pipeline import PipelinePlan, build_pipeline_module

# DeepSpeed's pipeline sends activations with torch.distributed.broadcast inside autograd; torch warns about it
# on every step. The gradients are sent explicitly by the engine, so the warning does not apply.
warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


def default_ds_config() -> Path:
    """bf16 on GPUs, fp32 on CPU (DS_ACCELERATOR=cpu or no CUDA)."""
    on_cpu = os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()
    return CONFIG_DIR / ("pipe_zero1_cpu.json" if on_cpu else "pipe_zero1_bf16.json")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("layout and optimisation (batch sizes, lr and ZeRO stage fill the JSON's \"auto\")")
    g.add_argument("--pp", type=int, default=2, help="pipeline stages; data-parallel replicas = world size / pp")
    g.add_argument("--ds-config", type=Path, default=None,
                   help="DeepSpeed JSON (default: ds_configs/pipe_zero1_bf16.json on GPU, pipe_zero1_cpu.json on CPU)")
    g.add_argument("--micro-batch-size", type=int, default=4, help="sequences per micro-batch per rank")
    g.add_argument("--grad-accum-steps", type=int, default=None, help="micro-batches per step (default 2*pp)")
    g.add_argument("--global-batch-size", type=int, default=None, help="alternative to --grad-accum-steps")
    g.add_argument("--zero-stage", type=int, default=None, help="default: the JSON's zero_optimization.stage")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --max-steps")
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--max-steps", type=int, default=1000)
    g.add_argument("--partition-method", default="compute", help="compute | parameters | uniform | type:REGEX")
    g.add_argument("--activation-checkpoint-interval", type=int, default=0, help="blocks per checkpoint; 0 = off")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--no-dropout", action="store_true",
                   help="dropout off (deterministic across layouts: resuming on another pp/dp continues the curve)")
    g = parser.add_argument_group("checkpoints and output")
    g.add_argument("--resume-from", type=Path, default=None,
                   help="a pptk checkpoint (runs/x/checkpoints or .../step200); any pp/dp if the global batch is kept")
    g.add_argument("--export-hf", type=Path, default=None,
                   help="after training, export the last checkpoint to this Hugging Face directory")
    g.add_argument("--output-dir", type=Path, required=True, help="checkpoints, metrics.jsonl, W&B (shared by all nodes)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--eval-every", type=int, default=200)
    g.add_argument("--eval-batches", type=int, default=8, help="micro-batches per evaluation")
    g.add_argument("--save-every", type=int, default=500, help="steps between checkpoints; the last step is saved")
    g.add_argument("--wandb-project", default="pptk")
    g.add_argument("--wandb-mode", default=None, choices=["online", "offline", "disabled"],
                   help="default: online when a W&B key is configured, else offline")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def layout_from_args(args: argparse.Namespace, ds_config: dict) -> Layout:
    """The layout, checked against WORLD_SIZE before any process group exists (every rank fails the same way)."""
    zero = args.zero_stage
    if zero is None:
        json_zero = ds_config.get("zero_optimization", {}).get("stage", 1)
        zero = 1 if json_zero == "auto" else int(json_zero)
    accum = args.grad_accum_steps
    if accum is None and args.global_batch_size is None:
        accum = 2 * args.pp  # enough micro-batches to keep the 1F1B bubble at 1/3 or less
    return Layout.from_world(world_size=world_size(), pp=args.pp, micro_batch_size=args.micro_batch_size,
                             grad_accum_steps=accum, global_batch_size=args.global_batch_size, zero_stage=zero)


def resolve_ds_config(args: argparse.Namespace, layout: Layout | None = None) -> tuple[dict, Layout]:
    raw = load_ds_config(args.ds_config or default_ds_config())
    layout = layout or layout_from_args(args, raw)
    warmup = args.warmup_steps or max(1, args.max_steps // 20)
    config = fill_ds_config(raw, layout=layout, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=warmup,
                            total_steps=args.max_steps, grad_clip=args.grad_clip)
    validate_ds_config(config, layout=layout)
    return config, layout


def wandb_mode(requested: str | None) -> str:
    if requested:
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


def init_distributed() -> None:
    import deepspeed

    from pptk.launch import COLLECTIVE_TIMEOUT

    backend = "gloo" if os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available() else None
    deepspeed.init_distributed(dist_backend=backend, timeout=COLLECTIVE_TIMEOUT)


def build_engine(plan: PipelinePlan, *, layout: Layout, ds_config: dict, args: argparse.Namespace,
                 dynamic_shape: bool = False):
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    # Reproducible dropout: each rank's generators are seeded by the run's seed and its global rank, so a rerun, or
    # the same layout spread over several nodes, draws the same masks.
    deepspeed.runtime.utils.set_random_seed(args.seed + torch.distributed.get_rank())
    topology = PipeDataParallelTopology(num_pp=layout.pp, num_dp=layout.dp)
    module = build_pipeline_module(plan, topology=topology, seed=args.seed, dynamic_shape=dynamic_shape,
                                   activation_checkpoint_interval=args.activation_checkpoint_interval)
    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=ds_config)
    return engine


class MetricsLog:
    """metrics.jsonl (one object per logged step), Weights & Biases and a progress bar; active on global rank 0."""

    def __init__(self, *, output_dir: Path, args: argparse.Namespace, config: dict, total_steps: int):
        import torch.distributed as dist

        self.active = not dist.is_initialized() or dist.get_rank() == 0
        self.path = output_dir / "metrics.jsonl"
        self.run = None
        self.bar = None
        if not self.active:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        mode = wandb_mode(args.wandb_mode)
        if mode != "disabled":
            import wandb

            self.run = wandb.init(project=args.wandb_project, dir=str(output_dir), mode=mode, config=config,
                                  settings=wandb.Settings(silent=True))
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True, mininterval=2.0)

    def log(self, record: dict) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def advance(self, steps: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> str | None:
        if self.bar is not None:
            self.bar.close()
        if self.run is not None:
            run_dir = str(Path(self.run.dir).parent)  # the run folder, not its files/ subfolder
            self.run.finish()
            return run_dir
        return None


@dataclass
class TrainSummary:
    first_loss: float
    last_loss: float
    steps: int
    tokens_per_s: float
    eval_loss: float | None
    checkpoint_dir: Path
    metrics_path: Path
    wandb_dir: str | None


def evaluate(engine, batches: Callable[[], Iterator], num_batches: int) -> float:
    """Mean loss over ``num_batches`` micro-batches, broadcast to every stage."""
    return float(engine.eval_batch(batches(), num_micro_batches=num_batches))


def resume_step(engine, plan: PipelinePlan, *, layout: Layout, args: argparse.Namespace) -> int:
    """Restore --resume-from (if given); returns the number of steps already done."""
    if args.resume_from is None:
        return 0
    from pptk.checkpoint import resume

    step = resume(engine, plan, layout=layout, path=args.resume_from)["step"]
    if step >= args.max_steps:
        raise PptkError(f"the checkpoint is at step {step} and --max-steps is {args.max_steps}; raise --max-steps")
    return step


def export_hf(args: argparse.Namespace, summary: "TrainSummary") -> None:
    """--export-hf: the last checkpoint as a Hugging Face directory (rank 0 streams it from disk)."""
    import torch.distributed as dist

    if args.export_hf is None:
        return
    if dist.get_rank() == 0:
        from pptk.convert import ds_to_hf

        ds_to_hf(summary.checkpoint_dir, args.export_hf)
    dist.barrier()


def train(engine, train_iter: Iterator, *, args: argparse.Namespace, plan: PipelinePlan, layout: Layout,
          tokens_per_sample: int, eval_batches: Callable[[], Iterator] | None, log: MetricsLog,
          start_step: int = 0, evaluate_at: Callable[[int], bool] | None = None,
          on_evaluate: Callable[[int], dict | None] | None = None) -> TrainSummary:
    """Run steps start_step+1 .. args.max_steps; evaluate, log and checkpoint on the way.

    Evaluation runs every --eval-every steps and at the end, or at the steps ``evaluate_at`` selects (epoch ends,
    say). It is the loss over ``eval_batches``, or whatever ``on_evaluate(step)`` computes and returns to be logged.
    """
    ckpt_dir = args.output_dir / "checkpoints"
    samples_per_step = layout.global_batch_size
    first_loss = last_loss = float("nan")
    eval_loss = None
    window_start, window_steps, total_time = time.perf_counter(), 0, 0.0
    for step in range(start_step + 1, args.max_steps + 1):
        loss = float(engine.train_batch(train_iter))
        if not math.isfinite(loss):
            raise PptkError(f"loss became {loss} at step {step}; lower --lr or raise --warmup-steps")
        first_loss = loss if step == start_step + 1 else first_loss
        last_loss = loss
        window_steps += 1
        log.advance(1, loss=loss)
        if step % args.log_every == 0 or step == args.max_steps:
            elapsed = time.perf_counter() - window_start
            total_time += elapsed
            samples_per_s = samples_per_step * window_steps / elapsed
            log.log({"step": step, "loss": loss, "lr": engine.get_lr()[0],
                     "tokens_per_s": samples_per_s * tokens_per_sample, "samples_per_s": samples_per_s})
            window_start, window_steps = time.perf_counter(), 0
        due = evaluate_at(step) if evaluate_at else (step % args.eval_every == 0 or step == args.max_steps)
        if due and on_evaluate is not None:
            record = on_evaluate(step)
            if record:
                log.log({"step": step, **record})
            window_start = time.perf_counter()  # evaluation time is not training throughput
        elif due and eval_batches is not None:
            eval_loss = evaluate(engine, eval_batches, args.eval_batches)
            log.log({"step": step, "eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))})
            window_start = time.perf_counter()
        if step % args.save_every == 0 or step == args.max_steps:
            save_checkpoint(engine, plan, layout=layout, checkpoints_dir=ckpt_dir, step=step)
            window_start = time.perf_counter()
    steps = args.max_steps - start_step
    tokens_per_s = samples_per_step * tokens_per_sample * steps / total_time if total_time else 0.0
    return TrainSummary(first_loss, last_loss, steps, tokens_per_s, eval_loss, ckpt_dir, log.path, None)
