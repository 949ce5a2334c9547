# The parallel layout (pp x tp x dp ranks, micro-batches, ZeRO stage) as one frozen dataclass that validates itself.
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pptk.errors import PptkError
from pptk.parallel.schedules import ideal_efficiency, schedule_problem


@dataclass(frozen=True)
class Range:
    """The values one numeric setting accepts. ``flag`` names it in the error: the name users type, which a Python
    caller recognises too. The layout's ranges are here; pptk.training.config.NUMBERS adds every other number."""

    flag: str
    low: float
    high: float = math.inf
    integer: bool = True
    low_excluded: bool = False  # low itself is refused (an lr of 0)
    off: float | None = None  # one more accepted value, outside the range, that turns the setting off

    def describe(self) -> str:
        if self.integer:
            text = (
                f"an integer >= {self.low}" if self.high == math.inf else f"an integer from {self.low} to {self.high}"
            )
        else:
            text = f"a finite number {'>' if self.low_excluded else '>='} {self.low}"
            text += f" and <= {self.high}" if self.high != math.inf else ""
        return text + (f", or {self.off} (off)" if self.off is not None else "")

    def accepts(self, value: object) -> bool:
        # bool is an int subclass: pp=True is a bug, not 1
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.off is not None and value == self.off:
            return True
        return (value > self.low if self.low_excluded else value >= self.low) and value <= self.high

    def problem(self, value: object) -> str | None:
        return None if self.accepts(value) else f"{self.flag} must be {self.describe()}, got {value!r}"


LAYOUT_RANGES = {
    "pp": Range("--pp", 1),
    "tp": Range("--tp", 1),
    "dp": Range("--dp", 1),
    "micro_batch_size": Range("--micro-batch-size", 1),
    "grad_accum_steps": Range("--grad-accum-steps", 1),
    "zero_stage": Range("--zero-stage", 0, 3),
    "global_batch_size": Range("--global-batch-size", 1),  # Layout.from_world divides it into grad_accum_steps
}


def layout_problems(
    *,
    pp: Any,
    tp: Any = 1,
    dp: Any = None,
    micro_batch_size: Any = None,
    grad_accum_steps: Any = None,
    zero_stage: Any = None,
    schedule: str = "1f1b",
) -> list[str]:
    """Everything wrong with a layout, as far as it is known. None: not known yet (dp until WORLD_SIZE is,
    grad_accum_steps until a global batch size is divided, zero_stage until the DeepSpeed JSON is read).

    A Layout checks itself with this, and pptk.training.config.check_settings asks it for RunConfig, `pptk plan`
    and `pptk verify`: all of them refuse the same layouts, with the same words."""
    given = dict(
        pp=pp, tp=tp, dp=dp, micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps, zero_stage=zero_stage
    )
    problems = [
        problem
        for name, value in given.items()
        if value is not None and (problem := LAYOUT_RANGES[name].problem(value)) is not None
    ]
    if problems:  # the rules below compare the numbers, so they need valid ones
        return problems
    if zero_stage is not None and zero_stage >= 2 and pp > 1:
        problems.append(
            f"--zero-stage {zero_stage} with --pp {pp}: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only; "
            "use --zero-stage 1 (optimizer-state sharding across the dp replicas) or --pp 1"
        )
    schedule_error = schedule_problem(schedule, pp=pp, micro_batches=grad_accum_steps, tp=tp)
    return problems + ([schedule_error] if schedule_error is not None else [])


@dataclass(frozen=True, kw_only=True)
class Layout:
    """How WORLD_SIZE ranks split into pp pipeline stages x tp tensor-parallel shards x dp data-parallel replicas,
    and how a step is batched. The tp ranks of one stage hold slices of the same layers (pptk.parallel.tensor_parallel).

    One optimizer step on one dp replica runs `grad_accum_steps` micro-batches of `micro_batch_size` sequences
    through the pipeline; DeepSpeed's pipeline engine calls these "micro_batches" and needs at least one.
    With pp > 1, keep grad_accum_steps >= 2 * pp: the pipeline bubble (stages idle while the pipe fills and
    drains) is about (pp - 1) / (grad_accum_steps + pp - 1) of each step, see `bubble_fraction`.
    """

    pp: int
    dp: int
    micro_batch_size: int
    grad_accum_steps: int
    zero_stage: int = 1
    schedule: str = "1f1b"  # or "dualpipev" (see pptk.parallel.schedules)
    tp: int = 1  # tensor-parallel shards of every stage (Megatron-style, see pptk.parallel.tensor_parallel)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def world_size(self) -> int:
        return self.pp * self.tp * self.dp

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step over all replicas: DeepSpeed's train_batch_size."""
        return self.micro_batch_size * self.grad_accum_steps * self.dp

    @property
    def bubble_fraction(self) -> float:
        """Share of a step a stage idles in this schedule with balanced stages (0 without pipelining)."""
        if self.schedule == "1f1b":
            return (self.pp - 1) / (self.grad_accum_steps + self.pp - 1)
        return 1.0 - ideal_efficiency(self.schedule, pp=self.pp, micro_batches=self.grad_accum_steps)

    def validate(self) -> None:
        problems = layout_problems(
            pp=self.pp,
            tp=self.tp,
            dp=self.dp,
            micro_batch_size=self.micro_batch_size,
            grad_accum_steps=self.grad_accum_steps,
            zero_stage=self.zero_stage,
            schedule=self.schedule,
        )
        if problems:
            raise PptkError("invalid parallel layout: " + "; ".join(problems))

    def describe(self) -> str:
        ranks = f"pp({self.pp}) x tp({self.tp}) x dp({self.dp})" if self.tp > 1 else f"pp({self.pp}) x dp({self.dp})"
        text = (
            f"{ranks} = WORLD_SIZE({self.world_size}); "
            f"global batch {self.global_batch_size} = micro_batch {self.micro_batch_size} "
            f"x grad_accum {self.grad_accum_steps} x dp {self.dp}; ZeRO-{self.zero_stage}"
        )
        if self.pp > 1:
            text += f"; pipeline bubble ~{self.bubble_fraction:.0%}"
            text += " (dualpipev)" if self.schedule == "dualpipev" else ""
        return text

    @classmethod
    def from_world(
        cls,
        *,
        world_size: int,
        pp: int,
        micro_batch_size: int,
        tp: int = 1,
        grad_accum_steps: int | None = None,
        global_batch_size: int | None = None,
        zero_stage: int = 1,
        schedule: str = "1f1b",
    ) -> Layout:
        """Derive dp from the launcher's WORLD_SIZE, and grad_accum_steps from a global batch size if given."""
        world_problem = Range("WORLD_SIZE", 1).problem(world_size)
        problems = [world_problem] if world_problem is not None else []
        problems += layout_problems(pp=pp, tp=tp, micro_batch_size=micro_batch_size)  # the arithmetic below needs them
        if problems:
            raise PptkError("; ".join(problems))
        if tp > 1 and world_size % (pp * tp):
            choices = ", ".join(f"{d} (dp {world_size // d})" for d in _divisors(world_size) if d % tp == 0 and d > 1)
            raise PptkError(
                f"pp({pp}) * tp({tp}) = {pp * tp} does not divide WORLD_SIZE({world_size}): WORLD_SIZE = pp x tp x dp; "
                f"launch a multiple of {pp * tp} ranks, or choose pp x tp from: {choices or 'none with this tp'}"
            )
        if world_size % pp:
            choices = ", ".join(str(d) for d in _divisors(world_size))
            raise PptkError(
                f"pp({pp}) does not divide WORLD_SIZE({world_size}): every dp replica needs all {pp} stages; "
                f"for WORLD_SIZE {world_size} use --pp {choices}, or launch a multiple of {pp} ranks"
            )
        dp = world_size // (pp * tp)
        if global_batch_size is None and grad_accum_steps is None:
            raise PptkError(
                "pass grad_accum_steps (micro-batches per step) or global_batch_size (sequences per step); "
                f"with micro_batch_size {micro_batch_size} x dp {dp}, global_batch_size "
                f"{micro_batch_size * dp * 2 * pp} gives grad_accum_steps {2 * pp} (= 2 * pp)"
            )
        if global_batch_size is not None:
            derived = _accum_from_global(global_batch_size, micro_batch_size=micro_batch_size, dp=dp)
            if grad_accum_steps is not None and grad_accum_steps != derived:
                raise PptkError(
                    f"grad_accum_steps({grad_accum_steps}) disagrees with global_batch_size({global_batch_size}) "
                    f"= micro_batch_size({micro_batch_size}) * grad_accum_steps({derived}) * dp({dp}); "
                    "pass only one of them"
                )
            grad_accum_steps = derived
        assert grad_accum_steps is not None  # given, or derived from global_batch_size above
        return cls(
            pp=pp,
            tp=tp,
            dp=dp,
            micro_batch_size=micro_batch_size,
            grad_accum_steps=grad_accum_steps,
            zero_stage=zero_stage,
            schedule=schedule,
        )


def _accum_from_global(global_batch_size: int, *, micro_batch_size: int, dp: int) -> int:
    per_accum = micro_batch_size * dp
    problem = LAYOUT_RANGES["global_batch_size"].problem(global_batch_size)
    if problem is not None:
        raise PptkError(problem)
    if global_batch_size % per_accum == 0:
        return global_batch_size // per_accum
    lower = global_batch_size // per_accum * per_accum
    upper = lower + per_accum
    options = [f"{n} (grad_accum_steps {n // per_accum})" for n in (lower, upper) if n > 0]
    raise PptkError(
        f"global_batch_size({global_batch_size}) is not a multiple of micro_batch_size({micro_batch_size}) * "
        f"dp({dp}) = {per_accum}: {global_batch_size} / {per_accum} = {global_batch_size / per_accum:.2f} "
        f"micro-batches per step; use global_batch_size {' or '.join(options)}, or change micro_batch_size"
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
