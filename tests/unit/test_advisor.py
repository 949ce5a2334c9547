# The layout advisor's arithmetic on a model small enough to count by hand, and `pptk plan --gpus` on a 70B shape.
import dataclasses
import json

import pytest

from pptk.cli import main
from pptk.parallel.activations import BlockShape
from pptk.parallel.advisor import (
    Candidate,
    Hardware,
    Workload,
    advise,
    attention_flops_per_token,
    forecast,
    parse_memory,
    rank_memory,
)
from pptk.parallel.partition import LayerCost, plan_stages

# embedding (1000 parameters, a free lookup), 4 blocks (100 parameters, 200 FLOPs per token), head (1000, 2000)
COSTS = (
    LayerCost(0, "Embed", "embed", 1000, 1000, 0.0),
    *(LayerCost(i, "Block", "block", 100, 100, 200.0) for i in range(1, 5)),
    LayerCost(5, "Head", "head", 1000, 1000, 2000.0),
)
# hidden 8, 2 heads of 4, 2 key/value heads, MLP 16, vocabulary 32
SHAPE = BlockShape("rms_swiglu", hidden=8, heads=2, kv_heads=2, head_dim=4, intermediate=16, vocab=32)
WORKLOAD = Workload(shape=SHAPE, costs=COSTS, seq_len=4, global_batch_size=8, precision="bf16")
HARDWARE = Hardware(gpus=4, memory_bytes=1e6, tflops=1e-9, mfu=1.0)  # 1000 FLOP/s: step times in round numbers

# per token of a bf16 block: fp32 (2 x 8 norm inputs + 2 rsqrt) + bf16 (4 x 8 norm outputs + 2 x 4 cos/sin)
# + bf16 (2 x 8 q and attention output + 2 x 8 k/v + 4 x 16 MLP) + fp32 (2 heads' log-sum-exp)
BLOCK_PER_TOKEN = 4 * (16 + 2) + 2 * (32 + 8) + 2 * (16 + 16 + 64) + 4 * 2  # 352
HIDDEN_PER_TOKEN = 2 * 8  # a bf16 hidden state: the pipe buffer each side of a stage boundary
# final RMSNorm (fp32 input + rsqrt, two bf16 outputs) and the fp32 log-softmax over 32 words
HEAD_SAVED_PER_TOKEN = 4 * (8 + 1) + 2 * 16 + 4 * 32  # 196
HEAD_TRANSIENT_PER_TOKEN = (2 + 4 + 4) * 32  # the bf16 logits, their fp32 copy, the log-softmax's gradient
BACKWARD = 2 * 4 * BLOCK_PER_TOKEN  # a block's backward: gradients next to its saved set, as two blocks' worth


def test_pp2_dp2_forecast_by_hand():
    stages = plan_stages(list(COSTS), num_stages=2)
    # the head (2000) outweighs blocks: three blocks go to stage 0 (600), one joins the head (2200)
    assert stages.boundaries == (0, 4, 6)
    result = forecast(
        Candidate(pp=2, tp=1, dp=2, micro_batch_size=1, checkpoint_interval=0),
        WORKLOAD,
        HARDWARE,
        stages=stages,
        tp_problem=None,
    )
    assert result.problem is None and result.micro_batches == 4  # 8 sequences / (dp 2 x 1)
    tokens = 4
    per_param = 8 + 12 / 2  # bf16, ZeRO-1 over dp=2 (BF16_Optimizer adds nothing at the step: STEP_BYTES)
    stage0 = 1300 * per_param + 2 * tokens * (3 * BLOCK_PER_TOKEN + HIDDEN_PER_TOKEN) + BACKWARD  # 2 in flight
    # 1 in flight; the head's transient (1280) is less than a block's backward (2816)
    stage1 = 1100 * per_param + tokens * (BLOCK_PER_TOKEN + HIDDEN_PER_TOKEN + HEAD_SAVED_PER_TOKEN) + BACKWARD
    assert tokens * HEAD_TRANSIENT_PER_TOKEN < BACKWARD
    assert result.rank_bytes == pytest.approx((stage0, stage1)) == (29592, 20472)
    # (m + pp - 1) slots of the slowest stage's 3 x forward FLOPs for 4 tokens, at 1000 FLOP/s
    assert result.step_seconds == pytest.approx(5 * 3 * 2200 * 4 / 1000)
    assert result.bubble == pytest.approx(1 / 5)


def test_checkpointing_trades_memory_for_a_recomputed_forward():
    stages = plan_stages(list(COSTS), num_stages=2)
    on = forecast(Candidate(2, 1, 2, 1, checkpoint_interval=1), WORKLOAD, HARDWARE, stages=stages, tp_problem=None)
    # stage 0 keeps each block's input (4 bf16 hidden states with the sent output) x 2 in flight, and recomputes one
    assert on.rank_bytes[0] == pytest.approx(1300 * 14 + 2 * 4 * 4 * HIDDEN_PER_TOKEN + 4 * BLOCK_PER_TOKEN + BACKWARD)
    # stage 1: the block recomputed (4 x its FLOPs) + the head (3 x)
    assert on.step_seconds == pytest.approx(5 * (4 * 200 + 3 * 2000) * 4 / 1000)


def test_advise_ranks_fits_by_step_time_and_says_why_the_rest_fail():
    tight = Hardware(gpus=4, memory_bytes=29000 / 0.9, tflops=1e-9, mfu=1.0, node_size=2)
    results = advise(WORKLOAD, tight, micro_batch_sizes=(1, 4), tp_problem=lambda tp: "no" if tp == 3 else None)
    fits = [f for f in results if f.problem is None]
    assert fits and [f.step_seconds for f in fits] == sorted(f.step_seconds for f in fits)
    assert all(max(f.rank_bytes) <= 29000 for f in fits)
    problems = {
        (f.candidate.pp, f.candidate.tp, f.candidate.micro_batch_size, f.candidate.checkpoint_interval): f.problem
        for f in results
        if f.problem and not f.candidate.selective
    }
    assert problems[(1, 4, 1, 0)] == "tp(4) > 2 GPUs per node: tp stays within a node"
    assert problems[(1, 1, 4, 0)] == "global batch 8 is not a multiple of dp(4) x micro-batch (4)"
    assert problems[(2, 1, 1, 0)].startswith("out of memory on stage 0 by 0.0 GiB")  # 29592 > 29000
    assert (2, 1, 1, 1) not in problems  # checkpointing makes pp=2 x dp=2 fit, and so does recomputing attention:
    selective = [f for f in fits if f.candidate.selective and (f.candidate.pp, f.candidate.dp) == (2, 2)]
    assert selective and selective[0].candidate.micro_batch_size == 1 and selective[0].peak_bytes == 27512
    pp8 = advise(WORKLOAD, Hardware(gpus=8, memory_bytes=1e6, tflops=1e-9), micro_batch_sizes=(1,))
    assert all("every stage needs at least one block" in f.problem for f in pp8 if f.candidate.pp == 8)


def test_a_vocabulary_split_divides_embedding_head_and_logits_by_tp():
    """At tp=2 with the embedding (layer 0) and head (layer 5) split by vocabulary: each holds half its parameters,
    the loss half its fp32 log-softmax per token, and the head half its FLOPs; nothing else changes."""
    stages = plan_stages(list(COSTS), num_stages=2)
    layout = Candidate(pp=2, tp=2, dp=1, micro_batch_size=1, checkpoint_interval=0)
    whole = forecast(layout, WORKLOAD, HARDWARE, stages=stages, tp_problem=None)
    split_workload = dataclasses.replace(WORKLOAD, vocab_layers=frozenset({0, 5}))
    split = forecast(layout, split_workload, HARDWARE, stages=stages, tp_problem=None)
    per_param = 8 + 12  # bf16, ZeRO-1 over dp=1
    tokens = 4
    assert whole.rank_bytes[0] - split.rank_bytes[0] == pytest.approx(500 * per_param)
    # stage 1 (1 micro-batch in flight) at tp=2: a block keeps 252 bytes per token (norms replicated, the rest
    # halved), the head's saved set is 196 whole or 132 split (half the 32 fp32 log-softmax entries), and a block's
    # backward holds 2 x 252 on top. Whole, the peak comes after the backward instead, when BF16_Optimizer adds the
    # head's 1000-element gradient into its fp32 buffer through an fp32 copy (4000 bytes) and nothing else is held.
    block_tp2 = 4 * (2 * 8 + 2) + 2 * (4 * 8 + 2 * 4) + (2 * (16 + 16 + 64) + 4 * 2) / 2
    assert block_tp2 == 252
    assert whole.rank_bytes[1] == pytest.approx(1050 * per_param + 4 * 1000)
    kept = tokens * (block_tp2 + HIDDEN_PER_TOKEN + 4 * (8 + 1) + 2 * 16 + 4 * 16)
    assert split.rank_bytes[1] == pytest.approx(550 * per_param + kept + 2 * tokens * block_tp2)
    # the slowest stage (block 4 split over tp, then the head): 3 x (200 / 2 + 2000) -> 3 x (200 / 2 + 2000 / 2)
    slots = 8 + 2 - 1
    assert whole.step_seconds == pytest.approx(slots * 3 * (100 + 2000) * tokens / 1000)
    assert split.step_seconds == pytest.approx(slots * 3 * (100 + 1000) * tokens / 1000)


def test_selective_checkpointing_frees_attention_and_recomputes_its_forward():
    stages = plan_stages(list(COSTS), num_stages=2)
    off = forecast(Candidate(2, 1, 2, 1, 0), WORKLOAD, HARDWARE, stages=stages, tp_problem=None)
    attn = forecast(Candidate(2, 1, 2, 1, 0, selective=True), WORKLOAD, HARDWARE, stages=stages, tp_problem=None)
    # what a bf16 block's attention saves per token: its input and cos/sin (2 x (8 + 2 x 4)), q and its output, k
    # and v (2 x (2 x 8 + 2 x 8)) and the fp32 log-sum-exp of 2 heads: stage 0 keeps 3 blocks' x 2 micro-batches in
    # flight less, and its backward recomputes one attention's on top
    attention_per_token = 2 * (8 + 2 * 4) + 2 * (2 * 8 + 2 * 8) + 4 * 2
    assert off.rank_bytes[0] - attn.rank_bytes[0] == pytest.approx((2 * 3 - 1) * 4 * attention_per_token) == 2080
    # stage 1's block recomputes its attention's forward: projections 2 x (2 x 8 x 8 + 2 x 8 x 8) + scores 2 x 4 x 8
    assert attention_flops_per_token(SHAPE, seq_len=4) == 576
    assert attn.step_seconds == pytest.approx(5 * (3 * 200 + 576 + 3 * 2000) * 4 / 1000)


def test_fp32_zero1_peaks_at_the_optimizer_step_when_activations_are_small():
    """DeepSpeedZeroOptimizer's fp32 gradient partition and its Adam temporaries (STEP_BYTES, 8 per parameter over
    dp) exist only in the step, when no activation does: a rank's peak is the larger of the two."""
    fp32 = dataclasses.replace(WORKLOAD, precision="fp32")
    stages = plan_stages(list(COSTS), num_stages=2)
    result = forecast(Candidate(2, 1, 1, 1, 0), fp32, HARDWARE, stages=stages, tp_problem=None)
    memory = rank_memory(
        stages, fp32, tp=1, dp=1, zero_stage=1, micro_batch_size=1, micro_batches=8, checkpoint_interval=0
    )
    assert memory.train_state == pytest.approx((1300 * (8 + 12), 1100 * (8 + 12)))
    assert memory.optimizer_step == pytest.approx((1300 * 8, 1100 * 8))
    # stage 0 holds 2 micro-batches' activations (more than its step adds), stage 1 one (less)
    assert memory.activations[0] > memory.optimizer_step[0] and memory.activations[1] < memory.optimizer_step[1]
    assert result.rank_bytes == pytest.approx(
        (memory.train_state[0] + memory.activations[0], memory.train_state[1] + memory.optimizer_step[1])
    )


def test_parse_memory():
    assert parse_memory("80GB") == parse_memory("80GiB") == 80 * 2**30
    assert parse_memory("0.5TB") == 2**39


LLAMA_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "intermediate_size": 28672,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def llama_70b(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama70b") / "config.json"
    path.write_text(json.dumps(LLAMA_70B))
    return str(path)


def test_plan_gpus_ranks_llama_70b_layouts_on_16_gpus(llama_70b, capsys):
    assert main(["plan", llama_70b, "--gpus", "16", "--gpu-memory", "80GB", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "80 blocks; 16 GPUs x 80.00 GiB" in out and "measured (CPU)" in out and "modelled (GPU)" in out
    assert "pp=1 tp=16 dp=1: tp(16) > 8 GPUs per node" in out
    argv = ["plan", llama_70b, "--gpus", "64", "--gpu-memory", "80GB", "--seq-len", "4096", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    fits = plan["fits"]
    assert fits, "70B in bf16 on 64 x 80 GB fits with pp x tp splitting the 70B parameters"
    assert [f["step_seconds"] for f in fits] == sorted(f["step_seconds"] for f in fits)
    assert all(f["peak_gib"] <= plan["usable_gib"] and f["pp"] * f["tp"] * f["dp"] == 64 for f in fits)
    # the fastest recomputes attention alone (3 x forward + attention) where whole blocks (4 x) are not needed to fit
    assert (fits[0]["selective"], fits[0]["checkpoint_interval"]) == (True, 0), fits[0]
    assert {(f["selective"], f["checkpoint_interval"]) for f in fits} == {(True, 0), (False, 1)}
    rejected = {(r["pp"], r["tp"]): r["problem"] for r in plan["rejected"]}
    assert rejected[(1, 1)].startswith("out of memory on stage 0 by")
