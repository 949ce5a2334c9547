# Measured pipeline efficiency: per-stage forward/backward/communication/optimizer/idle time, bubble, imbalance, MFU.
"""Every rank times each pipeline instruction DeepSpeed executes (``deepspeed_compat.time_instructions``: two
``perf_counter`` calls and a list append per instruction). On logging steps the ranks' timings of that step are
gathered on rank 0, which splits each rank's step into

- ``forward`` (ForwardPass, LoadMicroBatch), ``backward`` (BackwardPass), ``optimizer`` (OptimizerStep): busy;
- ``comm``: moving data (send/recv of activations and gradients, DualPipeV's CommitP2P, the tied-weight and
  data-parallel gradient all-reduces), estimated per transfer kind (a send and its receive are one kind) as the
  fastest such instruction of the step on any rank: a transfer nobody waited for;
- ``comm_wait``: the rest of the time inside those instructions, spent waiting for a peer to get there;
- ``idle``: the time between instructions (the schedule's own bookkeeping, loss averaging).

The measured bubble of a stage is ``(comm_wait + idle) / step``, the share of the step it spent neither computing
nor moving data; the run's bubble is the mean over stages. ``pptk timeline`` draws the same split, so the idle it
shows is the bubble logged. Stage imbalance is max / min busy time over stages. Stages are pipeline ranks (under
DualPipeV a rank holds two model stages); with data parallelism, replica 0's ranks are reported.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CATEGORIES = {
    "LoadMicroBatch": "forward",
    "ForwardPass": "forward",
    "BackwardPass": "backward",
    "OptimizerStep": "optimizer",
    "SendActivation": "comm",
    "RecvActivation": "comm",
    "SendGrad": "comm",
    "RecvGrad": "comm",
    "CommitP2P": "comm",
    "ReduceTiedGrads": "comm",
    "ReduceGrads": "comm",
}
# A send and its matching receive move the same bytes: one transfer class, whose fastest instance is the estimate.
TRANSFERS = {
    "SendActivation": "activations",
    "RecvActivation": "activations",
    "SendGrad": "gradients",
    "RecvGrad": "gradients",
}
BUSY = ("forward", "backward", "optimizer")
PARTS = ("forward", "backward", "comm", "comm_wait", "optimizer", "idle")
TIMELINE_FILE = "timeline.json"

# Dense peak TFLOP/s per device: (bf16/fp16 tensor cores, fp32 via TF32), from the vendors' data sheets.
PEAK_TFLOPS = {
    "H200": (989.0, 494.0),
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.0, 494.0),
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "A10G": (70.0, 35.0),
    "L4": (121.0, 60.0),
    "V100": (125.0, 15.7),
}


def peak_tflops(*, precision: str, override: float | None = None) -> float | None:
    """Per-device peak for MFU: ``--peak-tflops``, else the known-device table, else None (CPU, unknown GPU)."""
    if override is not None:
        return override
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, (half, single) in PEAK_TFLOPS.items():  # longest names first where they share a prefix
        if key in name:
            return single if precision == "fp32" else half
    return None


def training_flops_per_token(plan) -> float:
    """Forward + backward FLOPs per token from the cost model (backward = 2 x forward), without recomputation."""
    return 3.0 * sum(c.flops_per_token for c in plan.stages.costs)


@dataclass
class StepRecorder:
    """This rank's instruction timings of the current step (only inside ``step()``; evaluation is not recorded)."""

    events: list[tuple[str, int, float, float]] = field(default_factory=list)
    began: float = 0.0
    ended: float = 0.0
    active: bool = False
    synchronize: bool = False

    def clock(self) -> float:
        """The host clock; on a GPU, in a step being sampled, after the device has finished its queued work (CUDA
        kernels run asynchronously, so without it a forward would measure only its launch)."""
        if self.synchronize:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
        return time.perf_counter()

    def record(self, name: str, kwargs: dict, start: float, end: float) -> None:
        if self.active:
            self.events.append((name, int(kwargs.get("phase", 0)), start, end))

    @contextmanager
    def step(self, *, synchronize: bool = False) -> Iterator[None]:
        self.events = []
        self.active, self.synchronize = True, synchronize
        self.began = self.clock()
        try:
            yield
        finally:
            self.ended = self.clock()
            self.active, self.synchronize = False, False

    def snapshot(self) -> dict:
        """The step relative to its start: what a rank sends to rank 0."""
        return {
            "step_s": self.ended - self.began,
            "events": [(name, phase, start - self.began, end - self.began) for name, phase, start, end in self.events],
        }


def analyse_step(ranks: list[dict]) -> list[dict]:
    """Per-rank breakdown (seconds) of one step, and each instruction's interval split into wait and work."""
    fastest: dict[str, float] = {}
    for rank in ranks:
        for name, _, start, end in rank["events"]:
            kind = TRANSFERS.get(name, name)
            fastest[kind] = min(fastest.get(kind, float("inf")), end - start)
    result = []
    for rank in ranks:
        parts = dict.fromkeys(PARTS, 0.0)
        intervals = []
        for name, phase, start, end in rank["events"]:
            category = CATEGORIES.get(name, "comm")
            wait = max(0.0, (end - start) - fastest[TRANSFERS.get(name, name)]) if category == "comm" else 0.0
            parts[category] += (end - start) - wait
            parts["comm_wait"] += wait
            intervals.append({"name": name, "phase": phase, "start": start, "end": end, "kind": category, "wait": wait})
        parts["idle"] = max(0.0, rank["step_s"] - sum(parts.values()))
        busy = sum(parts[k] for k in BUSY)
        result.append(
            {
                **{k: rank[k] for k in ("rank", "stage", "dp_rank")},
                "step_s": rank["step_s"],
                **{f"{k}_s": v for k, v in parts.items()},
                "busy_s": busy,
                "bubble": (parts["comm_wait"] + parts["idle"]) / rank["step_s"] if rank["step_s"] else 0.0,
                "intervals": intervals,
            }
        )
    return result


def summarise(stages: list[dict], *, flops_per_step: float, world_size: int, peak: float | None) -> dict[str, float]:
    """The flat metrics of one step for metrics.jsonl and W&B (``pipe/...``); times in milliseconds."""
    step_s = max(s["step_s"] for s in stages)
    busy = [s["busy_s"] for s in stages]
    metrics: dict[str, float] = {
        "pipe/step_ms": 1000 * step_s,
        "pipe/bubble": sum(s["bubble"] for s in stages) / len(stages),
        "pipe/imbalance": max(busy) / min(busy) if min(busy) > 0 else float("inf"),
        "pipe/tflops": flops_per_step / step_s / 1e12,
    }
    if peak:
        metrics["pipe/mfu"] = metrics["pipe/tflops"] / (peak * world_size)
    for s in stages:
        for part in PARTS:
            metrics[f"pipe/stage{s['stage']}/{part}_ms"] = 1000 * s[f"{part}_s"]
        metrics[f"pipe/stage{s['stage']}/bubble"] = s["bubble"]
    return metrics


class PipelineObserver:
    """Hooked into one engine by the trainer: ``with observer.step(): engine.train_batch(...)`` every step, and
    ``observer.metrics(step)`` (collective: every rank calls it) on logging steps."""

    def __init__(self, engine, *, plan, layout, tokens_per_step: float, precision: str, peak: float | None, out: Path):
        import torch.distributed as dist

        from pptk import deepspeed_compat

        self.recorder = StepRecorder()
        deepspeed_compat.time_instructions(engine, self.recorder.record, clock=self.recorder.clock)
        self.identity = {
            "rank": dist.get_rank(),
            "stage": engine.stage_id,
            "dp_rank": engine.grid.get_data_parallel_rank(),
        }
        self.schedule = layout.schedule
        self.micro_batches = layout.grad_accum_steps
        self.world_size = layout.world_size
        self.flops_per_step = training_flops_per_token(plan) * tokens_per_step
        self.peak = peak
        self.precision = precision
        self.out = out

    def step(self, *, synchronize: bool = False):
        """Record this step; ``synchronize``: wait for the GPU at every clock read (the steps whose metrics are
        logged), so their instruction times are the device's, not the launches'."""
        return self.recorder.step(synchronize=synchronize)

    def metrics(self, step: int) -> dict[str, Any]:
        """Rank 0: the last step's pipeline metrics (and ``timeline.json``); other ranks: {}."""
        import torch.distributed as dist

        mine = {**self.identity, **self.recorder.snapshot()}
        gathered: list[Any] | None = [None] * dist.get_world_size() if self.identity["rank"] == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if gathered is None:
            return {}
        replica = sorted((r for r in gathered if r["dp_rank"] == 0), key=lambda r: r["stage"])
        stages = analyse_step(replica)
        metrics = summarise(stages, flops_per_step=self.flops_per_step, world_size=self.world_size, peak=self.peak)
        timeline = {
            "step": step,
            "schedule": self.schedule,
            "micro_batches": self.micro_batches,
            "precision": self.precision,
            "metrics": metrics,
            "stages": stages,
        }
        tmp = self.out / (TIMELINE_FILE + ".tmp")
        tmp.write_text(json.dumps(timeline))
        tmp.replace(self.out / TIMELINE_FILE)
        return metrics


def precision_of(ds_config: dict) -> str:
    for name in ("bf16", "fp16"):
        if ds_config.get(name, {}).get("enabled") in (True, "true"):
            return name
    return "fp32"


class ExpertLoad:
    """Mixture of experts: the router loss and how evenly each stage's experts are loaded, per logged step.

    Read from what the stage protocol already carries (pptk.models.moe): a stage's own top-k counts are the router
    sums it sends on minus those it received, so nothing is added to the blocks. The hook sits on the stage module
    (DeepSpeed calls it once per micro-batch; a recomputation under activation checkpointing runs the layers, not
    the module, so nothing is counted twice); evaluation (``module.training`` False) is left out. Only a model
    with a router loss carries the sums (``output_router_logits``); others get no meter (pptk.models.moe).
    """

    def __init__(self, engine, *, num_experts: int):
        import torch.distributed as dist

        self.num_experts = num_experts
        grid = engine.grid
        self.identity = {"rank": dist.get_rank(), "stage": engine.stage_id, "dp_rank": grid.get_data_parallel_rank()}
        self._reset()
        engine.module.register_forward_hook(self._record)

    def _reset(self) -> None:
        self.per_layer = torch.zeros(self.num_experts, dtype=torch.float64)  # tokens per expert, per MoE layer
        self.micro_batches = 0
        self.aux: list[float] = []

    @torch.no_grad()
    def _record(self, module, args, output) -> None:
        from pptk.models.moe import RouterSums, load_balancing_loss

        if not module.training or not isinstance(output, tuple) or len(output) not in (4, 6):
            return
        inputs = args[0]
        sent = RouterSums.check(*output[-3:])
        received = RouterSums.check(*inputs[3:]) if isinstance(inputs, tuple) and len(inputs) == 6 else None
        counts, layer_tokens = sent.counts, sent.tokens
        if received is not None:
            counts, layer_tokens = counts - received.counts, layer_tokens - received.tokens
        real_tokens = int(inputs[1].sum())  # the attention mask, second on every stage's input
        layers = int(layer_tokens) // max(real_tokens, 1)  # this stage's MoE layers
        if layers:
            self.per_layer += counts.double().cpu() / layers
            self.micro_batches += 1
        if len(output) == 4:  # the last stage: the whole model's sums, the loss's aux term (before its coefficient)
            self.aux.append(float(load_balancing_loss(sent, num_experts=self.num_experts)))

    def metrics(self) -> dict[str, float]:
        """Collective (every rank calls it): rank 0 gets the numbers since the last call, other ranks {}.

        ``router_aux_loss``: Hugging Face's ``aux_loss`` (mean over micro-batches); per stage holding MoE layers,
        ``expert_tokens_max/stageS`` and ``expert_tokens_mean/stageS`` (tokens routed to an expert per MoE layer
        and micro-batch, over the data-parallel replicas) and their ratio ``expert_load_max_over_mean/stageS``
        (1.0: balanced; num_experts / top_k: one expert takes every token)."""
        import torch.distributed as dist

        mine = {**self.identity, "per_layer": self.per_layer.tolist(), "micro_batches": self.micro_batches}
        mine["aux"] = self.aux
        self._reset()
        gathered: list[Any] | None = [None] * dist.get_world_size() if self.identity["rank"] == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if gathered is None:
            return {}
        metrics: dict[str, float] = {}
        aux = [value for r in gathered for value in r["aux"]]
        if aux:
            metrics["router_aux_loss"] = sum(aux) / len(aux)
        for stage in sorted({r["stage"] for r in gathered}):
            held = [r for r in gathered if r["stage"] == stage and r["micro_batches"]]
            if not held:
                continue  # no MoE layer on this stage
            load = torch.tensor([r["per_layer"] for r in held]).sum(0) / sum(r["micro_batches"] for r in held)
            mean = float(load.mean())
            metrics[f"expert_tokens_max/stage{stage}"] = float(load.max())
            metrics[f"expert_tokens_mean/stage{stage}"] = mean
            metrics[f"expert_load_max_over_mean/stage{stage}"] = float(load.max()) / mean if mean else 0.0
        return metrics
