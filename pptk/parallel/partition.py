# Which layers go to which pipeline stage, and why: pure functions over per-layer costs.
"""The embedding layers always sit on the first stage and the head layers on the last; only the blocks move.

DeepSpeed's own ``partition_method="parameters"`` builds every layer on every rank just to count parameters and
balances parameter counts, which leaves an embedding-heavy first stage with few blocks. pptk measures layers on
the meta device (no memory) and balances by one of:

- ``compute`` (default): forward FLOPs per token (2 x matmul parameters, plus attention over ``seq_len``); the
  embedding lookup is free, the LM head costs 2 x vocab x hidden.
- ``parameters``: parameter counts, with a tied embedding counted on both stages that hold a copy (memory).
- ``uniform``: the same number of blocks per stage.
- ``type:REGEX``: the same number of layers whose class name matches REGEX (case-insensitive), as in DeepSpeed.
- ``profile``: measured forward+backward time per layer on this device and batch shape (``pptk.parallel.profile``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pptk.errors import PptkError
from pptk.models import PipeLayer

METHODS = ("compute", "profile", "parameters", "uniform", "type:REGEX")


@dataclass(frozen=True)
class LayerCost:
    index: int
    name: str
    role: str
    params: int  # parameters this layer holds on its stage (a tied copy counts where it is held)
    unique_params: int  # parameters counted once over the whole model (a tied copy counts only the first time)
    flops_per_token: float
    idle_params: int = 0  # mixture of experts: routed-expert parameters a token does not use (all but its top-k)

    @property
    def active_params(self) -> int:
        """Parameters one token computes with (all of them in a dense layer): what the FLOPs follow."""
        return self.params - self.idle_params


def layer_costs(
    layers: list[PipeLayer], *, hidden_size: int, seq_len: int, experts: tuple[int, int] | None = None
) -> list[LayerCost]:
    """Measure each layer on the meta device: nothing is allocated, nothing is initialised.

    experts: (top_k, num_experts) of a mixture-of-experts model (pptk.models.moe.experts_of). A block's FLOPs then
    follow its active parameters (top-k of the routed experts, every shared expert and router), its memory all."""
    costs, seen_tied = [], set()
    for index, layer in enumerate(layers):
        with torch.device("meta"):
            module = layer.spec.build()
        params = sum(p.numel() for p in module.parameters())
        idle = _idle_expert_params(module, experts) if experts and layer.role == "block" else 0
        unique = 0 if layer.tied_key in seen_tied else params
        if layer.tied_key:
            seen_tied.add(layer.tied_key)
        if layer.role == "embed":
            flops = 0.0  # a lookup
        elif layer.role == "block":
            flops = 2.0 * (params - idle) + 2.0 * seq_len * hidden_size  # matmuls + attention scores and mixing
        else:
            flops = 2.0 * params
        costs.append(LayerCost(index, layer.class_name, layer.role, params, unique, flops, idle))
    return costs


def _idle_expert_params(block: torch.nn.Module, experts: tuple[int, int]) -> int:
    """The routed experts' parameters a token leaves unused: Hugging Face keeps each MoE layer's routed experts in
    one ``experts`` module of [num_experts, ...] tensors (shared experts live in other modules, always active)."""
    top_k, num_experts = experts
    routed = sum(
        p.numel()
        for name, module in block.named_modules()
        if name.rsplit(".", 1)[-1] == "experts"
        for p in module.parameters(recurse=False)
        if p.dim() >= 2 and p.shape[0] == num_experts
    )
    return routed - routed * top_k // num_experts


@dataclass(frozen=True)
class StagePlan:
    boundaries: tuple[int, ...]  # stage s holds layers [boundaries[s], boundaries[s+1])
    costs: tuple[LayerCost, ...]
    method: str
    schedule: str = "1f1b"  # "dualpipev": 2 x pp stages, rank r holds stages r and 2pp-1-r
    measured_ms: tuple[float, ...] | None = None  # per layer, forward+backward, when method == "profile"

    @property
    def num_stages(self) -> int:
        return len(self.boundaries) - 1

    @property
    def num_ranks(self) -> int:
        """Pipeline ranks (DeepSpeed's num_stages): each holds two stages under DualPipeV."""
        return self.num_stages // 2 if self.schedule == "dualpipev" else self.num_stages

    def rank_of_stage(self, stage: int) -> int:
        return min(stage, self.num_stages - 1 - stage) if self.schedule == "dualpipev" else stage

    def rank_stages(self, rank: int) -> tuple[int, ...]:
        return (rank, self.num_stages - 1 - rank) if self.schedule == "dualpipev" else (rank,)

    def rank_of(self, layer_index: int) -> int:
        """The pipeline rank holding a layer."""
        return self.rank_of_stage(self.stage_of(layer_index))

    def rank_layers(self, rank: int) -> tuple[LayerCost, ...]:
        return tuple(c for s in self.rank_stages(rank) for c in self.stage_layers(s))

    def stage_layers(self, stage: int) -> tuple[LayerCost, ...]:
        return self.costs[self.boundaries[stage] : self.boundaries[stage + 1]]

    def stage_of(self, layer_index: int) -> int:
        return next(s for s in range(self.num_stages) if layer_index < self.boundaries[s + 1])

    def summary(self) -> list[dict]:
        rows = []
        for s in range(self.num_stages):
            held = self.stage_layers(s)
            rows.append(
                {
                    "stage": s,
                    "rank": self.rank_of_stage(s),
                    "layers": [f"{c.index}:{c.name}" for c in held],
                    "blocks": sum(c.role == "block" for c in held),
                    "params": sum(c.params for c in held),
                    "active_params": sum(c.active_params for c in held),
                    "gflops_per_token": sum(c.flops_per_token for c in held) / 1e9,
                    **(
                        {"measured_ms": sum(self.measured_ms[c.index] for c in held)}
                        if self.measured_ms is not None
                        else {}
                    ),
                }
            )
        return rows

    def describe(self) -> str:
        rows = self.summary()
        peak = max(r["gflops_per_token"] for r in rows) or 1.0
        dual = self.schedule == "dualpipev"
        measured = self.measured_ms is not None
        header = f"{'stage':>5}  " + (f"{'rank':>4}  " if dual else "")
        header += f"{'blocks':>6}  {'params':>12}  {'GFLOP/token':>11}  {'load':>5}  "
        if measured:
            header += f"{'measured ms':>11}  {'load':>5}  "
        lines = [header + "layers"]
        peak_ms = max((r.get("measured_ms", 0.0) for r in rows), default=0.0) or 1.0
        for r in rows:
            line = f"{r['stage']:>5}  " + (f"{r['rank']:>4}  " if dual else "")
            line += (
                f"{r['blocks']:>6}  {r['params']:>12,}  {r['gflops_per_token']:>11.4f}  "
                f"{r['gflops_per_token'] / peak:>5.0%}  "
            )
            if measured:
                line += f"{r['measured_ms']:>11.2f}  {r['measured_ms'] / peak_ms:>5.0%}  "
            lines.append(line + ", ".join(r["layers"]))
        return "\n".join(lines)


def _weights(costs: list[LayerCost], method: str, measured_ms: tuple[float, ...] | None) -> list[float]:
    if method == "profile":
        if measured_ms is None or len(measured_ms) != len(costs):
            raise RuntimeError(
                "profile partition: pass one measured time per layer (pptk.parallel.profile.profile_layers)"
            )
        return list(measured_ms)
    if method == "compute":
        return [c.flops_per_token for c in costs]
    if method == "parameters":
        return [float(c.params) for c in costs]
    if method == "uniform":
        return [1.0 if c.role == "block" else 0.0 for c in costs]
    if method.startswith("type:"):
        pattern = re.compile(method[len("type:") :], re.IGNORECASE)
        weights = [1.0 if pattern.search(c.name) else 0.0 for c in costs]
        if not any(weights):
            names = sorted({c.name for c in costs})
            raise PptkError(f"partition method {method!r} matches no layer; layer classes are: {', '.join(names)}")
        return weights
    raise PptkError(f"unknown partition method {method!r}; choose one of: {', '.join(METHODS)}")


def plan_stages(
    costs: list[LayerCost],
    *,
    num_stages: int,
    method: str = "compute",
    schedule: str = "1f1b",
    measured_ms: tuple[float, ...] | None = None,
) -> StagePlan:
    """Split the layers into ``num_stages`` contiguous stages minimising the heaviest stage's cost.

    The embedding layers are pinned to stage 0 and the head layers to the last stage; every stage gets at least
    one block. Exact (dynamic programming over block boundaries), deterministic. Under DualPipeV ``num_stages`` is
    2 x pp: stage 0 and the last stage both sit on rank 0, so every rank carries two stages' load and min-max over
    stages balances the ranks too when the stages are balanced.
    ``method="profile"`` balances ``measured_ms`` (one forward+backward time per layer).
    """
    blocks = [c.index for c in costs if c.role == "block"]
    if num_stages < 1:
        raise PptkError(f"the number of pipeline stages must be at least 1, got {num_stages}")
    if num_stages > len(blocks):
        raise PptkError(
            f"pp={num_stages} stages but the model has only {len(blocks)} blocks; every stage needs at least one "
            f"block: use --pp {len(blocks) // 2 if schedule == 'dualpipev' else len(blocks)} or fewer"
            + (" (DualPipeV cuts the model into 2 x pp stages)" if schedule == "dualpipev" else "")
        )
    if blocks != list(range(blocks[0], blocks[0] + len(blocks))):
        raise RuntimeError("family-module bug: blocks must be contiguous, between the embedding and the head layers")
    weights = _weights(costs, method, measured_ms)
    first, last = blocks[0], blocks[-1] + 1
    head_extra = sum(weights[:first])
    tail_extra = sum(weights[last:])
    block_w = weights[first:last]
    n = len(block_w)
    prefix = [0.0]
    for w in block_w:
        prefix.append(prefix[-1] + w)

    def stage_cost(stage: int, i: int, j: int) -> float:  # blocks [i, j) on `stage`
        extra = (head_extra if stage == 0 else 0.0) + (tail_extra if stage == num_stages - 1 else 0.0)
        return prefix[j] - prefix[i] + extra

    inf = float("inf")
    # best[s][j]: the smallest possible heaviest-stage cost placing blocks [0, j) on stages 0..s-1
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for j in range(s, n - (num_stages - s) + 1):
            for i in range(s - 1, j):
                candidate = max(best[s - 1][i], stage_cost(s - 1, i, j))
                if candidate < best[s][j] - 1e-9:
                    best[s][j], cut[s][j] = candidate, i
    bounds, j = [n], n
    for s in range(num_stages, 0, -1):
        j = cut[s][j]
        bounds.append(j)
    bounds.reverse()
    boundaries = [0] + [first + b for b in bounds[1:-1]] + [len(costs)]
    return StagePlan(tuple(boundaries), tuple(costs), method, schedule, measured_ms)
