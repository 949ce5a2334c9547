# The stage planner: embedding first, head last, every stage a block, and the heaviest stage as light as possible.
import itertools

import pytest

from pptk.errors import PptkError
from pptk.parallel.partition import LayerCost, plan_stages
from pptk.parallel.pipeline import plan_pipeline


def _costs(block_weights, *, embed=(5.0,), head=(1.0, 7.0)):
    roles = ["embed"] * len(embed) + ["block"] * len(block_weights) + ["head"] * len(head)
    weights = list(embed) + list(block_weights) + list(head)
    return [LayerCost(i, f"L{i}", role, int(w), int(w), float(w)) for i, (role, w) in enumerate(zip(roles, weights))]


def _brute_force_best(costs, stages):
    blocks = [c.index for c in costs if c.role == "block"]
    best = None
    for cuts in itertools.combinations(blocks[1:], stages - 1):
        bounds = [0, *cuts, len(costs)]
        heaviest = max(sum(c.flops_per_token for c in costs[a:b]) for a, b in itertools.pairwise(bounds))
        best = heaviest if best is None else min(best, heaviest)
    return best


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("blocks", [[3, 1, 4, 1, 5, 9, 2, 6], [1] * 6, [10, 1, 1, 1, 1, 10]])
def test_plan_is_optimal_and_respects_pins(blocks, stages):
    costs = _costs(blocks)
    plan = plan_stages(costs, num_stages=stages, method="compute")
    assert plan.boundaries[0] == 0 and plan.boundaries[-1] == len(costs)
    assert all(plan.stage_of(c.index) == 0 for c in costs if c.role == "embed")
    assert all(plan.stage_of(c.index) == stages - 1 for c in costs if c.role == "head")
    assert all(any(c.role == "block" for c in plan.stage_layers(s)) for s in range(stages))
    heaviest = max(sum(c.flops_per_token for c in plan.stage_layers(s)) for s in range(stages))
    assert heaviest == pytest.approx(_brute_force_best(costs, stages))


def test_uniform_spreads_blocks_evenly_and_type_regex_counts_matches():
    costs = _costs([1, 100, 1, 100, 1, 100])
    uniform = plan_stages(costs, num_stages=3, method="uniform")
    assert [r["blocks"] for r in uniform.summary()] == [2, 2, 2]
    typed = plan_stages(costs, num_stages=2, method="type:^L[2-4]$")  # layers 2, 3, 4 matter
    assert typed.stage_of(2) == 0 and typed.stage_of(4) == 1


def test_compute_method_gives_the_embedding_stage_more_blocks_than_parameters_method():
    """The embedding is parameter-heavy but nearly free to run: 'parameters' starves stage 0, 'compute' does not."""
    plan_c = plan_pipeline("gpt2", num_stages=2, partition_method="compute")
    plan_p = plan_pipeline("gpt2", num_stages=2, partition_method="parameters")
    blocks = lambda plan: [r["blocks"] for r in plan.stages.summary()]  # noqa: E731
    assert blocks(plan_c)[0] >= blocks(plan_p)[0]
    assert sum(blocks(plan_c)) == sum(blocks(plan_p)) == 4


def test_bad_requests_name_the_fix():
    costs = _costs([1, 1, 1])
    with pytest.raises(PptkError, match="pp=4 stages but the model has only 3 blocks.*--pp 3 or fewer"):
        plan_stages(costs, num_stages=4)
    with pytest.raises(PptkError, match="unknown partition method 'flops'"):
        plan_stages(costs, num_stages=2, method="flops")
    with pytest.raises(PptkError, match="matches no layer; layer classes are: L0"):
        plan_stages(costs, num_stages=2, method="type:Nope")
    with pytest.raises(PptkError, match="at least 1"):
        plan_stages(costs, num_stages=0)
