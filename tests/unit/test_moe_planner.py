# The planner on mixture-of-experts models: compute follows the active experts (top-k of the routed ones, plus the
# shared experts and routers), memory follows all of them.
import pytest
import torch

from pptk.models import get_family
from pptk.models.decoder_families import MOE_FAMILIES
from pptk.models.moe import experts_of
from pptk.parallel.pipeline import plan_pipeline


def hf_expert_params(model_type):
    """Per MoE layer, from Hugging Face's own model: (all parameters, routed-expert parameters)."""
    from transformers import AutoModelForCausalLM

    config = get_family(model_type).small_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = model.model.layers
    moe = next(layer for layer in layers if any(n.endswith("experts") for n, _ in layer.named_modules()))
    routed = sum(p.numel() for n, p in moe.named_parameters() if ".experts." in n and "shared" not in n)
    return sum(p.numel() for p in moe.parameters()), routed


@pytest.mark.parametrize("model_type", sorted(MOE_FAMILIES))
def test_active_params_count_top_k_of_the_routed_experts(model_type):
    plan = plan_pipeline(model_type, num_stages=2, attn_implementation="eager")
    top_k, num_experts = experts_of(plan.config)
    assert (top_k, num_experts) == (2, 4)
    total, routed = hf_expert_params(model_type)
    blocks = [c for c in plan.stages.costs if c.role == "block"]
    moe_blocks = [c for c in blocks if c.params == total]
    assert moe_blocks, [c.params for c in blocks]
    for cost in moe_blocks:
        assert cost.active_params == total - routed // 2  # top-2 of 4 experts
        hidden, seq = plan.config.hidden_size, 64
        assert cost.flops_per_token == 2.0 * cost.active_params + 2.0 * seq * hidden
    for cost in plan.stages.costs:
        if cost.role != "block" or cost.params != total:  # embedding, head, dense blocks: all active
            assert cost.active_params == cost.params
    rows = plan.stages.summary()
    assert sum(r["params"] for r in rows) > sum(r["active_params"] for r in rows)
    assert all({"params", "active_params"} <= set(r) for r in rows)


def test_dense_models_have_every_parameter_active():
    plan = plan_pipeline("llama", num_stages=2)
    assert experts_of(plan.config) is None
    assert all(r["active_params"] == r["params"] for r in plan.stages.summary())


def test_compute_partition_follows_active_experts_not_memory():
    """Qwen2-MoE with a dense layer 2 and 16 wide experts, top-1: by parameters a MoE block is the heaviest, by
    compute the dense block is; the compute partition must not count the idle experts."""
    config = get_family("qwen2_moe").small_config()
    config.num_experts = 16
    config.moe_intermediate_size = 64
    config.num_experts_per_tok = 1
    config.shared_expert_intermediate_size = 16
    flops = plan_pipeline(config, num_stages=2, partition_method="compute")
    by_cost = {c.index: c for c in flops.stages.costs}
    moe_block, dense_block = by_cost[1], by_cost[3]  # layer 0 is MoE, layer 2 dense (mlp_only_layers=[2])
    assert moe_block.params > dense_block.params and moe_block.active_params < dense_block.params
    assert moe_block.flops_per_token < dense_block.flops_per_token
