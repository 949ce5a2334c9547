# Pipeline schedules: 1f1b (DeepSpeed's TrainSchedule) or dualpipev (DeepSpeed's DualPipeV); their constraints.
"""Under ``dualpipev`` each pipeline rank r holds two stages, r and 2pp-1-r (DeepSpeed's ``DualPipeVModule``):
micro-batches go out through the first half of the model and come back through the second, so rank 0 holds both
the embedding and the head (tied weights need no cross-rank reduction). DeepSpeed's ``DualPipeVEngine`` asserts its
constraints deep in ``deepspeed.initialize``; ``check_schedule`` says the same before any rank starts.
"""

from __future__ import annotations

from pptk.errors import PptkError

SCHEDULES = ("1f1b", "dualpipev")


def stages_for(schedule: str, pp: int) -> int:
    """How many stages the planner cuts the model into."""
    return 2 * pp if schedule == "dualpipev" else pp


def needs_fixed_shapes(schedule: str) -> bool:
    """DualPipeV exchanges activation shapes once: every micro-batch must have the same sequence length."""
    return schedule == "dualpipev"


def check_schedule(schedule: str, *, pp: int, micro_batches: int | None = None, tp: int = 1) -> None:
    """One clear error for a schedule the layout cannot run."""
    problem = schedule_problem(schedule, pp=pp, micro_batches=micro_batches, tp=tp)
    if problem is not None:
        raise PptkError(problem)


def schedule_problem(schedule: str, *, pp: int, micro_batches: int | None = None, tp: int = 1) -> str | None:
    """What stops this layout from running the schedule, or None; micro_batches None: not known yet."""
    if schedule not in SCHEDULES:
        return f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}"
    if schedule != "dualpipev":
        return None
    if pp < 2:
        return (
            f"--schedule dualpipev needs --pp 2 or more (got pp={pp}): it pairs the stages of a pipeline; use "
            "--schedule 1f1b for pp=1"
        )
    if tp > 1:  # not built yet (docs/parallelism.md): pptk's tensor parallelism runs under 1f1b only
        return (
            f"--schedule dualpipev with --tp {tp} is not supported yet (dualpipev runs tp=1 only); use --schedule 1f1b"
        )
    if micro_batches is not None and micro_batches < 2 * pp:
        return (
            f"--schedule dualpipev with pp={pp} needs at least 2 * pp = {2 * pp} micro-batches per step, got "
            f"{micro_batches}; raise --grad-accum-steps (or --micro-batches for verify) to {2 * pp}, or use "
            "--schedule 1f1b"
        )
    return None


def check_eval_micro_batches(schedule: str, *, pp: int, count: int, what: str) -> None:
    if schedule == "dualpipev" and count < 2 * pp:
        raise PptkError(
            f"{what}: an evaluation of {count} micro-batches, but DualPipeV with pp={pp} runs at least {2 * pp}; "
            f"raise --eval-batches to {2 * pp} (causal-LM), lower --micro-batch-size so the eval set fills "
            f"{2 * pp} micro-batches, or use --schedule 1f1b"
        )


def ideal_efficiency(schedule: str, *, pp: int, micro_batches: int, backward_ratio: float = 2.0) -> float:
    """Busy share of a step with free communication and balanced stages: DeepSpeed's schedule replayed with each
    stage's forward costing 1 / stages and its backward ``backward_ratio`` times that. 1F1B gives m / (m + pp - 1).
    """
    from pptk.deepspeed_compat import schedule_instructions

    if pp == 1:
        return 1.0
    stages = stages_for(schedule, pp)
    forward, backward = 1.0 / stages, backward_ratio / stages
    # (is_forward, stage, micro-batch) per compute instruction: a stage runs its micro-batches in order
    tasks: list[list[tuple[bool, int, int]]] = []
    for r in range(pp):
        program = schedule_instructions(
            dualpipev=schedule == "dualpipev", micro_batches=micro_batches, stages=pp, stage_id=r
        )
        seen: dict[tuple[bool, int], int] = {}
        tasks.append([])
        for name, kwargs in program:
            if name in ("ForwardPass", "BackwardPass"):
                stage = stages - 1 - r if kwargs.get("phase", 0) == 1 else r
                kind = (name == "ForwardPass", stage)
                tasks[r].append((kind[0], stage, seen.get(kind, 0)))
                seen[kind] = seen.get(kind, 0) + 1

    done: dict[tuple[str, int, int], float] = {}  # (kind, stage, micro-batch) -> finish time
    clock, position = [0.0] * pp, [0] * pp
    progress = True
    while progress:
        progress = False
        for r in range(pp):
            while position[r] < len(tasks[r]):
                is_forward, stage, micro = tasks[r][position[r]]
                if is_forward:
                    need = [("F", stage - 1, micro)] if stage > 0 else []
                    key, cost = ("F", stage, micro), forward
                else:
                    need = [("B", stage + 1, micro)] if stage < stages - 1 else [("F", stage, micro)]
                    key, cost = ("B", stage, micro), backward
                if any(n not in done for n in need):
                    break
                start = max([clock[r], *(done[n] for n in need)])
                clock[r] = done[key] = start + cost
                position[r] += 1
                progress = True
    if any(position[r] < len(tasks[r]) for r in range(pp)):
        raise RuntimeError("schedule replay deadlocked: the dependency model does not match DeepSpeed's schedule")
    busy = micro_batches * (1.0 + backward_ratio) / pp
    return busy / max(clock)
