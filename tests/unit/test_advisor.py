# The layout advisor's arithmetic on a model small enough to count by hand, and `pptk plan --gpus` on a 70B shape.
import dataclasses
import json

import pytest

from pptk.cli import main
from pptk.parallel.activations import BlockShape
from pptk.parallel.advisor import Candidate, Hardware, Workload, advise, forecast, parse_memory
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
    per_param = 13 + 12 / 2  # bf16, ZeRO-1 over dp=2
    stage0 = 1300 * per_param + 2 * tokens * (3 * BLOCK_PER_TOKEN + HIDDEN_PER_TOKEN) + BACKWARD  # 2 in flight
    # 1 in flight; the head's transient (1280) is less than a block's backward (2816)
    stage1 = 1100 * per_param + tokens * (BLOCK_PER_TOKEN + HIDDEN_PER_TOKEN + HEAD_SAVED_PER_TOKEN) + BACKWARD
    assert tokens * HEAD_TRANSIENT_PER_TOKEN < BACKWARD
    assert result.rank_bytes == pytest.approx((stage0, stage1)) == (36092, 25972)
    # (m + pp - 1) slots of the slowest stage's 3 x forward FLOPs for 4 tokens, at 1000 FLOP/s
    assert result.step_seconds == pytest.approx(5 * 3 * 2200 * 4 / 1000)
    assert result.bubble == pytest.approx(1 / 5)


def test_checkpointing_trades_memory_for_a_recomputed_forward():
    stages = plan_stages(list(COSTS), num_stages=2)
    on = forecast(Candidate(2, 1, 2, 1, checkpoint_interval=1), WORKLOAD, HARDWARE, stages=stages, tp_problem=None)
    # stage 0 keeps each block's input (4 bf16 hidden states with the sent output) x 2 in flight, and recomputes one
    assert on.rank_bytes[0] == pytest.approx(1300 * 19 + 2 * 4 * 4 * HIDDEN_PER_TOKEN + 4 * BLOCK_PER_TOKEN + BACKWARD)
    # stage 1: the block recomputed (4 x its FLOPs) + the head (3 x)
    assert on.step_seconds == pytest.approx(5 * (4 * 200 + 3 * 2000) * 4 / 1000)


def test_advise_ranks_fits_by_step_time_and_says_why_the_rest_fail():
    tight = Hardware(gpus=4, memory_bytes=30000 / 0.9, tflops=1e-9, mfu=1.0, node_size=2)
    results = advise(WORKLOAD, tight, micro_batch_sizes=(1, 4), tp_problem=lambda tp: "no" if tp == 3 else None)
    fits = [f for f in results if f.problem is None]
    assert fits and [f.step_seconds for f in fits] == sorted(f.step_seconds for f in fits)
    assert all(max(f.rank_bytes) <= 30000 for f in fits)
    problems = {
        (f.candidate.pp, f.candidate.tp, f.candidate.micro_batch_size, f.candidate.checkpoint_interval): f.problem
        for f in results
        if f.problem
    }
    assert problems[(1, 4, 1, 0)] == "tp(4) > 2 GPUs per node: tp stays within a node"
    assert problems[(1, 1, 4, 0)] == "global batch 8 is not a multiple of dp(4) x micro-batch (4)"
    assert problems[(2, 1, 1, 0)].startswith("out of memory on stage 0 by 0.0 GiB")  # 36092 > 30000
    assert (2, 1, 1, 1) not in problems  # checkpointing makes pp=2 x dp=2 fit
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
    per_param = 13 + 12  # bf16, ZeRO-1 over dp=1
    tokens = 4
    assert whole.rank_bytes[0] - split.rank_bytes[0] == pytest.approx(500 * per_param)
    # stage 1: half the head's weights, and half the 32 fp32 log-softmax entries per token of its 1 micro-batch
    assert whole.rank_bytes[1] - split.rank_bytes[1] == pytest.approx(500 * per_param + tokens * 4 * 16)
    # the slowest stage (block 4 split over tp, then the head): 3 x (200 / 2 + 2000) -> 3 x (200 / 2 + 2000 / 2)
    slots = 8 + 2 - 1
    assert whole.step_seconds == pytest.approx(slots * 3 * (100 + 2000) * tokens / 1000)
    assert split.step_seconds == pytest.approx(slots * 3 * (100 + 1000) * tokens / 1000)


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
    rejected = {(r["pp"], r["tp"]): r["problem"] for r in plan["rejected"]}
    assert rejected[(1, 1)].startswith("out of memory on stage 0 by")
