# The stage protocol: what crosses a boundary is checked, and masks are built once per stage and micro-batch.
import pytest
import torch

from pptk.errors import PptkError
from pptk.models.gpt2 import small_config
from pptk.models.moe import RouterSums, load_balancing_loss
from pptk.models.protocol import StageMasks, StageTensors, attention_mask_for, check_input_ids, default_position_ids
from pptk.parallel.pipeline import prepare_config


def _stage(batch=2, seq=5, hidden=8):
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 3:] = 0
    return StageTensors(torch.randn(batch, seq, hidden), mask, default_position_ids(mask))


def test_boundary_tensors_are_checked_by_name():
    stage = _stage()
    assert StageTensors.from_tuple(stage.as_tuple()).attention_mask is not None
    with pytest.raises(TypeError, match="attention_mask must be int64"):
        StageTensors.from_tuple((stage.hidden_states, stage.attention_mask.float(), stage.position_ids))
    with pytest.raises(TypeError, match="expected \\(hidden_states, attention_mask, position_ids\\["):
        StageTensors.from_tuple((stage.hidden_states, stage.attention_mask))
    with pytest.raises(TypeError, match="hidden_states must be float"):
        StageTensors.from_tuple((stage.attention_mask, stage.attention_mask, stage.position_ids))


def test_tensors_sent_between_stages_are_contiguous():
    # DeepSpeed's p2p send refuses non-contiguous tensors ("input tensor has to be contiguous").
    hidden = torch.randn(5, 2, 8).transpose(0, 1)
    mask = torch.ones(2, 5, dtype=torch.long)
    sent = StageTensors(hidden, mask, torch.arange(5).expand(2, 5)).as_tuple()
    assert all(t.is_contiguous() for t in sent)


def test_mask_is_built_once_per_stage_and_micro_batch():
    config = prepare_config(small_config(), attn_implementation="eager")
    stage = _stage()
    masks = StageMasks()
    first = masks("causal", config, stage)
    assert masks("causal", config, stage) is first  # same tensors: reused
    assert StageMasks()("causal", config, stage) is not first  # another model's cache: its own mask
    assert first.shape == (2, 1, 5, 5)
    assert first[1, 0, 4, 3] < -1e30 and first[1, 0, 2, 1] == 0  # padding key masked, earlier real key visible
    assert first[0, 0, 1, 2] < -1e30  # causal
    other = _stage()
    assert masks("causal", config, other) is not first  # a new micro-batch: rebuilt
    torch.testing.assert_close(masks("causal", config, other), attention_mask_for("causal", config, other))


def test_input_ids_are_checked_against_vocab_and_positions():
    check_input_ids(torch.tensor([[0, 9]]), vocab_size=10, max_positions=2)
    with pytest.raises(PptkError, match=r"token id 10 is outside the vocabulary \[0, 10\)"):
        check_input_ids(torch.tensor([[0, 10]]), vocab_size=10, max_positions=None)
    with pytest.raises(PptkError, match="token id -1"):
        check_input_ids(torch.tensor([[-1, 3]]), vocab_size=10, max_positions=None)
    with pytest.raises(PptkError, match="sequence length 3 is longer than the model's 2 positions"):
        check_input_ids(torch.tensor([[0, 1, 2]]), vocab_size=10, max_positions=2)
    with pytest.raises(PptkError, match="must be int64"):
        check_input_ids(torch.tensor([[0.0]]), vocab_size=10, max_positions=None)


def _router_sums(experts=4, *, counts_dtype=torch.long, probs_dtype=torch.float32):
    return (
        torch.tensor([3, 0, 2, 1], dtype=counts_dtype)[:experts],
        torch.rand(experts, dtype=probs_dtype),
        torch.tensor([3], dtype=torch.long),
    )


def test_router_sums_cross_with_the_stage_tensors_and_add_up():
    stage = _stage()
    assert len(stage.as_tuple()) == 3 and stage.with_router(None) is stage
    counts, probs, tokens = _router_sums()
    sent = stage.with_router(RouterSums(counts, probs, tokens)).as_tuple()
    assert len(sent) == 6
    received = StageTensors.from_tuple(sent)
    assert received.router is not None and torch.equal(received.router.counts, counts)
    # a later block adds its share; hidden-state replacement keeps the sums
    both = received.with_router(RouterSums(counts, probs, tokens)).with_hidden(stage.hidden_states * 2)
    assert both.router is not None
    assert both.router.counts.tolist() == [6, 0, 4, 2] and int(both.router.tokens) == 6
    torch.testing.assert_close(both.router.probs, 2 * probs)


def test_router_sums_are_checked_at_the_boundary():
    stage = _stage().as_tuple()
    with pytest.raises(TypeError, match="router counts must be int64"):
        StageTensors.from_tuple(stage + _router_sums(counts_dtype=torch.float32))
    with pytest.raises(TypeError, match=r"router probs must be fp32 \[4\]"):
        StageTensors.from_tuple(stage + _router_sums(probs_dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"expected \(hidden_states, attention_mask, position_ids\[, router_counts"):
        StageTensors.from_tuple(stage + _router_sums()[:2])


def test_load_balancing_loss_is_the_product_of_pooled_means():
    # two layers' shares pooled: E * sum(count/T * prob/T), which is not the sum of the two layers' own terms
    a = RouterSums(torch.tensor([2, 0]), torch.tensor([1.5, 0.5]), torch.tensor([1]))
    b = RouterSums(torch.tensor([0, 2]), torch.tensor([0.5, 1.5]), torch.tensor([1]))
    pooled = load_balancing_loss(a + b, num_experts=2)
    torch.testing.assert_close(pooled, torch.tensor(2 * (2 / 2 * 2 / 2 + 2 / 2 * 2 / 2)))
    separate = load_balancing_loss(a, num_experts=2) + load_balancing_loss(b, num_experts=2)
    assert abs(pooled.item() - separate.item()) > 1
