# The activation forecast against what real Hugging Face blocks save for backward, and its schedule arithmetic.
import pytest
import torch
from transformers import GPT2Config, LlamaConfig

from pptk.parallel.activations import (
    BACKWARD_BLOCKS,
    StageActivations,
    attention_bytes_per_token,
    block_bytes_per_token,
    block_shape,
    head_bytes_per_token,
    in_flight_profile,
    rank_activation_bytes,
    stage_activations,
)
from pptk.parallel.pipeline import SequentialPipe, plan_pipeline
from pptk.parallel.recompute import recompute_attention

CONFIGS = {
    "llama": LlamaConfig(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=344,
        num_hidden_layers=1,
        vocab_size=512,
        max_position_embeddings=256,
    ),
    "gpt2": GPT2Config(
        n_embd=128, n_head=4, n_layer=1, vocab_size=512, n_positions=256, bos_token_id=0, eos_token_id=0
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def saved_bytes_per_layer(config, precision: str, *, batch: int, seq_len: int, recompute: bool = False) -> list[float]:
    """What each pipeline layer's forward saves for backward (the loss included in the last), parameters excluded:
    every saved tensor's storage counted once. recompute: each block's attention recomputed (selective)."""
    plan = plan_pipeline(config, num_stages=1, seq_len=seq_len, task="causal-lm")
    torch.manual_seed(0)
    pipe = SequentialPipe(plan.layers).to(DTYPES[precision]).train()  # the tied head runs the embedding's weights
    modules = pipe.forward_funcs
    for layer, module in zip(plan.layers, modules):
        if recompute and layer.role == "block":
            recompute_attention(module)
    params = {p.untyped_storage().data_ptr() for p in pipe.parameters()}
    ids = torch.randint(3, config.vocab_size, (batch, seq_len))
    x, measured = (ids, torch.ones_like(ids)), []
    for index, module in enumerate(modules):
        seen: dict[int, int] = {}

        def pack(t, seen=seen):
            if t.untyped_storage().data_ptr() not in params and t.is_floating_point():
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x = module(x)
            if index == len(modules) - 1:
                plan.loss_fn()(x, ids)
        measured.append(float(sum(seen.values())))
    return measured


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_block_and_head_forecast_match_what_the_modules_save(family, precision):
    config = CONFIGS[family]
    batch, seq_len = 2, 64
    measured = saved_bytes_per_layer(config, precision, batch=batch, seq_len=seq_len)
    plan_roles = [layer.role for layer in plan_pipeline(config, num_stages=1, task="causal-lm").layers]
    shape = block_shape(config)
    tokens = batch * seq_len
    block = measured[plan_roles.index("block")]
    assert block == pytest.approx(tokens * block_bytes_per_token(shape, seq_len=seq_len, precision=precision), rel=0.02)
    head = sum(m for m, role in zip(measured, plan_roles) if role == "head")
    if family == "llama":  # GPT-2's head is the tied embedding, whose lookup and loss save the same
        assert head == pytest.approx(tokens * head_bytes_per_token(shape, precision=precision)[0], rel=0.02)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_selective_checkpointing_frees_what_the_forecast_says(family, precision):
    """A block whose attention is recomputed keeps its set minus attention_bytes_per_token (to 2%)."""
    config = CONFIGS[family]
    batch, seq_len = 2, 64
    roles = [layer.role for layer in plan_pipeline(config, num_stages=1, task="causal-lm").layers]
    whole = saved_bytes_per_layer(config, precision, batch=batch, seq_len=seq_len)[roles.index("block")]
    kept = saved_bytes_per_layer(config, precision, batch=batch, seq_len=seq_len, recompute=True)[roles.index("block")]
    freed = batch * seq_len * attention_bytes_per_token(block_shape(config), seq_len=seq_len, precision=precision)
    assert kept < 0.8 * whole
    assert whole - kept == pytest.approx(freed, rel=0.02)


def test_gpt2_scores_grow_with_the_square_of_the_sequence_and_llama_keeps_none():
    gpt2, llama = block_shape(CONFIGS["gpt2"]), block_shape(CONFIGS["llama"])
    for shape, grows in ((gpt2, True), (llama, False)):
        short, long = (block_bytes_per_token(shape, seq_len=s, precision="bf16") for s in (64, 128))
        assert (long > short) is grows


def test_tp_splits_heads_and_mlp_but_not_the_norms():
    shape = block_shape(CONFIGS["llama"])
    whole, half = (block_bytes_per_token(shape, seq_len=64, precision="bf16", tp=tp) for tp in (1, 2))
    h, kv, i = 128, 2 * 32, 344
    split = 2 * (2 * h + 2 * kv + 4 * i) + 4 * 4  # bf16 q/out, k, v, MLP; fp32 log-sum-exp per head
    assert whole - half == pytest.approx(split / 2)


def test_checkpointing_keeps_inputs_of_all_block_runs_only():
    shape = block_shape(CONFIGS["llama"])
    kw = dict(micro_batch_size=1, seq_len=64, precision="fp32", first=True, last=False)
    roles = ["embed", "block", "block", "block", "block"]
    block = 64 * block_bytes_per_token(shape, seq_len=64, precision="fp32")
    hidden = 64 * 4 * 128
    plain = stage_activations(roles, shape, **kw)
    assert plain.kept == pytest.approx(4 * block + hidden)  # + the sent output
    assert plain.transient == pytest.approx(BACKWARD_BLOCKS * block)  # gradients next to a block's saved set
    # interval 2 from the stage's first layer: [embed, block] is not checkpointed, [block, block] is, [block] is
    every_two = stage_activations(roles, shape, checkpoint_interval=2, **kw)
    assert every_two.kept == pytest.approx(block + 2 * hidden + hidden)
    assert every_two.transient == pytest.approx((2 + BACKWARD_BLOCKS) * block)  # one run recomputed at a time


@pytest.mark.parametrize(("pp", "m"), [(2, 4), (4, 8), (4, 2)])
def test_1f1b_holds_pp_minus_stage_micro_batches_as_deepspeed_schedules_them(pp, m):
    for rank in range(pp):
        assert max(c[0] for c in in_flight_profile("1f1b", pp=pp, micro_batches=m, rank=rank)) == min(pp - rank, m)
        stage = StageActivations(kept=10.0, transient=1.0)
        assert (
            rank_activation_bytes("1f1b", pp=pp, micro_batches=m, rank=rank, stages=[stage])
            == min(pp - rank, m) * 10 + 1
        )


def test_dualpipev_peak_comes_from_its_replayed_schedule():
    # rank 0 holds stage 0 and stage 3 of 4 at pp=2: its two halves' in-flight counts at the worst instruction
    profile = in_flight_profile("dualpipev", pp=2, micro_batches=4, rank=0)
    first, second = StageActivations(kept=1.0, transient=0.0), StageActivations(kept=100.0, transient=0.0)
    peak = rank_activation_bytes("dualpipev", pp=2, micro_batches=4, rank=0, stages=[first, second])
    assert peak == max(a + 100 * b for a, b in profile) and all(a >= 0 and b >= 0 for a, b in profile)
    assert profile[-1] == (0, 0)
