# The typed run configuration: what a recipe asks the trainer to do, frozen, serialisable, one source of truth.
"""A ``RunConfig`` is built once from a recipe's flags (``pptk.cli.run_flags``) or in Python, and then only read:
the trainer, the tasks and the DeepSpeed config filler take their settings from it. It is saved as it is into
every checkpoint's manifest and into W&B (``to_dict``).

Task-specific data settings live in the task's own dataclass (``pptk.tasks.causal_lm.CausalLMData``, ...), held
in ``RunConfig.data``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pptk.errors import PptkError


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """What to train: a local Hugging Face directory, a config.json or a model type (a small random config)."""

    model: str | None = None
    task: str | None = None  # None: inferred from the model (config.architectures) or fixed by the recipe
    tokenizer: Path | None = None  # default: the model directory
    attn_implementation: str = "sdpa"
    dropout: bool = True  # False makes a resume on another layout continue the curve exactly


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How the ranks split the work; dp is what remains of WORLD_SIZE (see ``pptk.parallel.layout.Layout``)."""

    pp: int = 2
    tp: int = 1  # tensor-parallel shards per stage (pptk.parallel.tensor_parallel); dp = WORLD_SIZE / (pp * tp)
    micro_batch_size: int = 4
    grad_accum_steps: int | None = None  # default 2 * pp: keeps the 1F1B bubble at a third or less
    global_batch_size: int | None = None  # alternative to grad_accum_steps
    zero_stage: int | None = None  # default: the DeepSpeed JSON's
    partition_method: str = "compute"
    activation_checkpoint_interval: int = 0
    schedule: str = "1f1b"  # or "dualpipev" (pptk.parallel.schedules)
    peak_tflops: float | None = None  # per device, for MFU; default: pptk.training.observe's known-device table


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The optimisation settings that fill the DeepSpeed JSON's "auto" values."""

    ds_config: Path | None = None  # default: the shipped config for this machine
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int | None = None  # default: 5% of the steps
    grad_clip: float = 1.0
    max_steps: int | None = 1000  # None: epochs * steps per epoch
    epochs: int | None = None  # epoch-based runs evaluate and checkpoint at every epoch end
    loss_spike_factor: float = (
        10.0  # a loss above this x the recent median is a bad step (0: off); pptk.training.guards
    )
    max_bad_steps: int = 3  # this many bad steps in a row stop the run


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    """Where results go and how often: checkpoints, metrics, W&B, the Hugging Face export."""

    output_dir: Path
    resume_from: Path | None = None
    export_hf: Path | None = None
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8  # micro-batches per evaluation (causal-LM; other tasks evaluate their whole eval set)
    eval_at_start: bool = False
    save_every: int = 500
    wandb_project: str = "pptk"
    wandb_mode: str | None = None  # None: online with a W&B key, else offline
    log_all_ranks: bool = False
    sample_prompt: str | None = None  # causal-LM: print a greedy sample of the export from this prompt
    overwrite: bool = False  # start over in an --output-dir that holds a finished run (see pptk.training.run_dir)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig
    data: Any  # the task's frozen data dataclass
    output: OutputConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 1234
    preset: str | None = None  # a named preset the flags started from (e.g. "demo")

    def __post_init__(self) -> None:
        problems = []
        required: tuple[tuple[str, int], ...] = (
            ("micro_batch_size", self.parallel.micro_batch_size),
            ("pp", self.parallel.pp),
            ("tp", self.parallel.tp),
            ("log_every", self.output.log_every),
            ("eval_every", self.output.eval_every),
            ("eval_batches", self.output.eval_batches),
            ("save_every", self.output.save_every),
            ("max_bad_steps", self.optim.max_bad_steps),
        )
        for name, value in required:
            if value < 1:
                problems.append(f"{name} must be at least 1, got {value}")
        if self.optim.loss_spike_factor != 0 and self.optim.loss_spike_factor <= 1:
            problems.append(f"loss_spike_factor must be above 1 (or 0: off), got {self.optim.loss_spike_factor}")
        optional: tuple[tuple[str, int | None], ...] = (
            ("max_steps", self.optim.max_steps),
            ("epochs", self.optim.epochs),
            ("warmup_steps", self.optim.warmup_steps),
        )
        for name, maybe in optional:
            if maybe is not None and maybe < 1:
                problems.append(f"{name} must be at least 1, got {maybe}")
        if self.optim.max_steps is None and self.optim.epochs is None:
            problems.append("give max_steps or epochs")
        if self.parallel.activation_checkpoint_interval < 0:
            problems.append(
                f"activation_checkpoint_interval must be >= 0, got {self.parallel.activation_checkpoint_interval}"
            )
        if problems:
            raise PptkError("invalid run configuration: " + "; ".join(problems))

    @property
    def checkpoints_dir(self) -> Path:
        return self.output.output_dir / "checkpoints"

    def to_dict(self) -> dict:
        """JSON-ready: paths as strings, the data section tagged with its class name."""

        def plain(value: Any) -> Any:
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value

        result = plain(self)
        result["data"] = {"kind": type(self.data).__name__, **plain(self.data)}
        return result
