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
from typing import TYPE_CHECKING, Any

from pptk.data.corpus import parse_entry
from pptk.errors import PptkError
from pptk.parallel.layout import LAYOUT_RANGES, Range, layout_problems

if TYPE_CHECKING:  # pptk.parallel.lora brings torch and DeepSpeed in: imported when a run asks for LoRA
    from pptk.parallel.lora import LoraSettings

# The accepted range of every number a run, `pptk plan` or `pptk verify` takes, by its field name; the flag names it in
# the error. check_settings is the one place they are checked (a blend weight's range is pptk.data.corpus's).
NUMBERS: dict[str, Range] = {
    **LAYOUT_RANGES,
    "micro_batches": Range("--micro-batches", 1),  # pptk verify's grad_accum_steps
    "activation_checkpoint_interval": Range("--activation-checkpoint-interval", 0),  # 0: off
    "peak_tflops": Range("--peak-tflops", 0, integer=False, low_excluded=True),
    "lr": Range("--lr", 0, integer=False, low_excluded=True),
    "weight_decay": Range("--weight-decay", 0, integer=False),
    "warmup_steps": Range("--warmup-steps", 1),  # DeepSpeed's Warmup* schedulers refuse 0
    "grad_clip": Range("--grad-clip", 0, integer=False),  # 0: off (DeepSpeed's gradient_clipping)
    "max_steps": Range("--max-steps", 1),
    "epochs": Range("--epochs", 1),
    "loss_spike_factor": Range("--loss-spike-factor", 1, integer=False, low_excluded=True, off=0),
    "max_bad_steps": Range("--max-bad-steps", 1),
    "log_every": Range("--log-every", 1),
    "eval_every": Range("--eval-every", 1),
    "eval_batches": Range("--eval-batches", 1),
    "save_every": Range("--save-every", 1),
    "seq_len": Range("--seq-len", 1),
    "max_seq_len": Range("--max-seq-len", 1),
    "num_labels": Range("--num-labels", 1),
    "samples": Range("--samples", 0),  # SFT: held-out prompts the export answers (0: none)
    "tolerance": Range("--tolerance", 0, integer=False, low_excluded=True),
    # LoRA (pptk.parallel.lora.LoraSettings checks them again, for callers that skip the flags; dropout < 1 there)
    "lora_r": Range("--lora-r", 1),
    "lora_alpha": Range("--lora-alpha", 0, integer=False, low_excluded=True),
    "lora_dropout": Range("--lora-dropout", 0, 1, integer=False),
    # pptk plan --gpus (the layout advisor)
    "gpus": Range("--gpus", 1),
    "gpus_per_node": Range("--gpus-per-node", 1),
    "top": Range("--top", 1),
    "mfu": Range("--mfu", 0, 1, integer=False, low_excluded=True),
    "gpu_tflops": Range("--gpu-tflops", 0, integer=False, low_excluded=True),
    # NumPy takes seeds below 2**32, and every rank seeds with seed + its rank: leave the upper half free
    "seed": Range("--seed", 0, 2**31 - 1),
}


def settings_problems(*, schedule: str = "1f1b", **numbers: Any) -> list[str]:
    """Every number by its NUMBERS range (None: not given, a default follows), then, when pp is among them, the
    layout they make (pptk.parallel.layout.layout_problems). verify's micro_batches is the layout's grad_accum_steps.
    """
    problems = [
        problem
        for name, value in numbers.items()
        if value is not None and (problem := NUMBERS[name].problem(value)) is not None
    ]
    if problems or "pp" not in numbers:
        return problems
    return layout_problems(
        pp=numbers["pp"],
        tp=numbers.get("tp", 1),
        dp=numbers.get("dp"),
        micro_batch_size=numbers.get("micro_batch_size"),
        grad_accum_steps=numbers.get("grad_accum_steps", numbers.get("micro_batches")),
        zero_stage=numbers.get("zero_stage"),
        schedule=schedule,
    )


def check_settings(*, schedule: str = "1f1b", **numbers: Any) -> None:
    """The check RunConfig, `pptk plan` and `pptk verify` make before anything runs: one line for all problems."""
    problems = settings_problems(schedule=schedule, **numbers)
    if problems:
        raise PptkError("; ".join(problems))


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
    # at tp > 1: split embedding, LM head and loss by vocabulary where the task allows (pptk.parallel.vocab_parallel)
    vocab_parallel: bool = True
    sequence_parallel: bool = False  # at tp > 1: norms and residuals hold S / tp (pptk.parallel.sequence_parallel)
    micro_batch_size: int = 4
    grad_accum_steps: int | None = None  # default 2 * pp: keeps the 1F1B bubble at a third or less
    global_batch_size: int | None = None  # alternative to grad_accum_steps
    zero_stage: int | None = None  # default: the DeepSpeed JSON's
    partition_method: str = "compute"
    activation_checkpoint_interval: int = 0
    selective_checkpointing: bool = False  # recompute each block's attention only (pptk.parallel.recompute)
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
    export_hf: Path | None = None  # with LoRA: the merged model (pptk.checkpoints.lora_convert)
    export_adapter: Path | None = None  # LoRA runs: the PEFT adapter directory, written at the end
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
    """Checked when built, before anything runs: every number against NUMBERS, the layout as far as it is known
    (dp waits for WORLD_SIZE), and the blend weights of the data section's --data entries."""

    model: ModelConfig
    data: Any  # the task's frozen data dataclass
    output: OutputConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 1234
    preset: str | None = None  # a named preset the flags started from (e.g. "demo")
    lora: LoraSettings | None = None  # train LoRA adapters on frozen weights (pptk.parallel.lora); None: in full

    def __post_init__(self) -> None:
        # The task's data section holds numbers too (seq_len, max_seq_len, num_labels); its fractions, whose ranges
        # differ by task, are checked by the task.
        parts = (self.parallel, self.optim, self.output, *([self.data] if dataclasses.is_dataclass(self.data) else []))
        numbers = {
            f.name: getattr(part, f.name) for part in parts for f in dataclasses.fields(part) if f.name in NUMBERS
        }
        problems = settings_problems(schedule=self.parallel.schedule, seed=self.seed, **numbers)
        if self.optim.max_steps is None and self.optim.epochs is None:
            problems.append("give --max-steps or --epochs")
        if self.output.export_adapter is not None and self.lora is None:
            problems.append("--export-adapter writes LoRA adapters: give --lora-r too (or drop --export-adapter)")
        if self.lora is not None:  # its own numbers are checked by LoraSettings itself
            from pptk.parallel.lora import LoraSettings, lora_layout_problems

            if not isinstance(self.lora, LoraSettings):
                problems.append(f"lora must be a LoraSettings or None, got {type(self.lora).__name__}")
            else:
                problems += lora_layout_problems(tp=self.parallel.tp)
        for spec in getattr(self.data, "files", ()):  # the --data entries of a pretraining task: DIR:WEIGHT
            try:
                parse_entry(spec)
            except PptkError as err:
                problems.append(str(err))
        if problems:
            raise PptkError("; ".join(problems))

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
