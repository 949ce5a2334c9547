# Tensor parallelism in one process: slicing rules, head splits against Hugging Face's own modules, refusals.
import pytest
import torch
from transformers import AutoConfig, GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

from pptk.errors import PptkError
from pptk.models.decoder_families import FAMILIES
from pptk.parallel.layout import Layout
from pptk.parallel.tensor_parallel import TP_REFUSED, ShardSpec, check_tensor_parallel, shard_spec, shard_stage
from pptk.training.ds_config import fill_ds_config


def test_fused_qkv_slices_take_each_ranks_heads_of_q_k_and_v():
    full = torch.arange(12).reshape(1, 12)  # q = 0..3, k = 4..7, v = 8..11
    shards = [ShardSpec(dim=1, rank=r, size=2, fused=3).take(full) for r in range(2)]
    assert shards[0].tolist() == [[0, 1, 4, 5, 8, 9]]
    assert shards[1].tolist() == [[2, 3, 6, 7, 10, 11]]
    assert torch.equal(ShardSpec(dim=1, rank=0, size=2, fused=3).merge(shards), full)
    assert ShardSpec(dim=1, rank=1, size=2, fused=3).full_shape((1, 6)) == (1, 12)


def _ranks_sum(module_factory, tp: int, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Without a process group (group None, DeepSpeed's "no parallel dimension") the row-parallel all-reduce is a
    no-op, so the sum of every rank's output is what the all-reduce would produce."""
    total = 0
    for rank in range(tp):
        module = module_factory()
        shard_stage(module, group=None, rank=rank, size=tp)
        out = module(x, **kwargs)
        total = total + (out[0] if isinstance(out, tuple) else out)
    return total


def _gpt2():
    config = GPT2Config(n_embd=32, n_head=4, n_layer=1)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    attn = GPT2Attention(config, layer_idx=0).eval()  # no dropout
    with torch.no_grad():
        attn.c_proj.bias.zero_()  # row-parallel bias is added on every rank here (once after a real all-reduce)
    return attn


@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_gpt2_attention_equals_hugging_face(tp):
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    full = _gpt2()(x)[0]
    assert torch.allclose(_ranks_sum(_gpt2, tp, x), full, atol=1e-6)


def test_contiguous_thirds_of_c_attn_would_be_wrong():
    """The check above can fail: giving rank r a contiguous slice of q|k|v (fused=1) mixes q, k and v heads."""
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    full = _gpt2()(x)[0]
    total = 0
    for rank in range(2):
        attn = _gpt2()
        spec = ShardSpec(dim=1, rank=rank, size=2, fused=1)
        with torch.no_grad():
            attn.c_attn.weight = torch.nn.Parameter(spec.take(attn.c_attn.weight))
            attn.c_attn.bias = torch.nn.Parameter(ShardSpec(dim=0, rank=rank, size=2).take(attn.c_attn.bias))
            attn.c_attn.nf = attn.c_attn.weight.shape[1]
            attn.c_proj.weight = torch.nn.Parameter(ShardSpec(dim=0, rank=rank, size=2).take(attn.c_proj.weight))
        attn.num_heads //= 2
        attn.split_size //= 2
        total = total + attn(x)[0]
    assert not torch.allclose(total, full, atol=1e-3)


def test_sharded_mlps_equal_hugging_face():
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))

    def gpt2_mlp():
        torch.manual_seed(0)
        mlp = GPT2MLP(128, GPT2Config(n_embd=32, n_head=4, resid_pdrop=0.0))
        with torch.no_grad():
            mlp.c_proj.bias.zero_()
        return mlp

    def llama_mlp():
        torch.manual_seed(0)
        return LlamaMLP(AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64))

    for factory in (gpt2_mlp, llama_mlp):
        assert torch.allclose(_ranks_sum(factory, 2, x), factory()(x), atol=1e-6)


def test_sharded_llama_gqa_attention_equals_hugging_face():
    config = AutoConfig.for_model(
        "llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_bias=False
    )
    config._attn_implementation = "sdpa"
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    cos, sin = torch.ones(2, 5, 8), torch.zeros(2, 5, 8)  # identity rotation: the head split is what is checked

    def attn():
        torch.manual_seed(0)
        return LlamaAttention(config, layer_idx=0)

    full = attn()(x, position_embeddings=(cos, sin), attention_mask=None)[0]
    sharded = attn()
    shard_stage(sharded, group=None, rank=1, size=2)
    assert sharded.config.num_attention_heads == 2 and sharded.config.num_key_value_heads == 1
    assert shard_spec(sharded.q_proj.weight) == ShardSpec(dim=0, rank=1, size=2)
    assert shard_spec(sharded.o_proj.weight) == ShardSpec(dim=1, rank=1, size=2)
    got = _ranks_sum(attn, 2, x, position_embeddings=(cos, sin), attention_mask=None)
    assert torch.allclose(got, full, atol=1e-6)


def test_bad_tp_is_refused_with_the_fix():
    llama = AutoConfig.for_model("llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(PptkError, match=r"num_key_value_heads\(2\) < tp\(4\).*Use --tp 1 or 2"):
        check_tensor_parallel(llama, 4)
    with pytest.raises(PptkError, match=r"num_attention_heads\(4\) is not divisible by tp\(3\)"):
        check_tensor_parallel(llama, 3)
    with pytest.raises(PptkError, match="phi3 has no tensor-parallel support.*fused projections.*--tp 1"):
        check_tensor_parallel(AutoConfig.for_model("phi3"), 2)
    check_tensor_parallel(AutoConfig.for_model("phi3"), 1)


def test_layout_counts_tp_ranks():
    layout = Layout.from_world(world_size=8, pp=2, tp=2, micro_batch_size=1, grad_accum_steps=4)
    assert (layout.pp, layout.tp, layout.dp, layout.world_size) == (2, 2, 2, 8)
    assert layout.describe().startswith("pp(2) x tp(2) x dp(2) = WORLD_SIZE(8)")
    with pytest.raises(PptkError, match=r"pp\(2\) \* tp\(2\) = 4 does not divide WORLD_SIZE\(6\)"):
        Layout.from_world(world_size=6, pp=2, tp=2, micro_batch_size=1, grad_accum_steps=4)
    with pytest.raises(PptkError, match="dualpipev.*tp"):
        Layout(pp=2, tp=2, dp=1, micro_batch_size=1, grad_accum_steps=4, schedule="dualpipev")


def test_ds_config_sends_whole_activations_between_tp_ranks():
    layout = Layout(pp=2, tp=2, dp=1, micro_batch_size=1, grad_accum_steps=4)
    filled = fill_ds_config({}, layout=layout)
    assert filled["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}
    with pytest.raises(PptkError, match="pipeline.pipe_partitioned"):
        fill_ds_config({"pipeline": {"pipe_partitioned": True}}, layout=layout)


# Hugging Face's own tensor-parallel plans (``config.base_model_tp_plan``) as the reference for pptk's structural rule:
# every family pptk shards is split exactly where its plan says "colwise"/"rowwise", and the parameters the plan
# marks "replicated_with_grad_allreduce" are the ones pptk sums over tp. The refused families' plans do not split
# heads Megatron-style either (they gather outputs), except cohere's, whose per-head norm pptk does not slice.
STYLES = {"colwise": "column", "rowwise": "row"}


def _block_plan(family: str) -> dict[str, str]:
    from pptk.models import get_family

    plan = getattr(get_family(family).small_config(), "base_model_tp_plan", None) or {}
    return {key.removeprefix("layers.*."): style for key, style in plan.items()}


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(TP_REFUSED)))
def test_pptk_splits_each_block_where_hugging_faces_tp_plan_does(family):
    from pptk.parallel.pipeline import plan_pipeline, resolve_model
    from pptk.parallel.tensor_parallel import PARTIAL_GRAD_ATTR, ShardedLinear

    expected = _block_plan(family)
    assert expected, f"{family} has no base_model_tp_plan"
    attn = "eager" if family in ("gemma2", "vaultgemma") else "sdpa"  # soft-capping: no SDPA path in transformers
    layers = plan_pipeline(resolve_model(family), num_stages=1, attn_implementation=attn).layers
    block = next(layer for layer in layers if layer.role == "block").spec.build()
    shard_stage(block, group=None, rank=0, size=2)
    split = {name: module.kind for name, module in block.named_modules() if isinstance(module, ShardedLinear)}
    partial = {name.rsplit(".", 1)[0] for name, p in block.named_parameters() if getattr(p, PARTIAL_GRAD_ATTR, False)}

    def owner(suffix: str, names) -> str | None:
        return next((name for name in names if name == suffix or name.endswith("." + suffix)), None)

    for suffix, style in expected.items():
        if style in STYLES:
            name = owner(suffix, split)
            assert name is not None and split[name] == STYLES[style], (suffix, style, split)
        elif style == "replicated_with_grad_allreduce":
            assert owner(suffix, partial) is not None, (suffix, partial)
    assert len(split) == sum(style in STYLES for style in expected.values()), split


@pytest.mark.parametrize("family", ["phi3", "glm", "glm4", "olmo2", "olmo3"])
def test_the_families_pptk_refuses_are_not_head_split_by_hugging_face_either(family):
    styles = set(_block_plan(family).values())
    assert styles & {"colwise_gather_output", "rowwise_split_input"}, styles
