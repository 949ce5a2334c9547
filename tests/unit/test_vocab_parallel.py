# The vocabulary split's arithmetic in one process: padded slices, the manifest's record, the refusals, and the
# loss against Hugging Face's. The split itself runs at tp=2 against Hugging Face in
# tests/distributed/test_tensor_parallel_dist.py (pp=2 x tp=2, tied and untied, odd vocabularies, fp32 and bf16).
import pytest
import torch
from transformers import AutoConfig
from transformers.loss.loss_utils import ForCausalLMLoss

from pptk.checkpoints.layer_files import tensor_parallel_entry
from pptk.models import get_family, layers_for
from pptk.parallel.pipeline import plan_pipeline
from pptk.parallel.tensor_parallel import ShardSpec
from pptk.parallel.vocab_parallel import VocabShard, vocab_parallel_causal_lm_loss, vocab_parallel_problem


def test_a_padded_split_takes_equal_slices_and_merges_without_the_padding():
    full = torch.arange(5 * 3, dtype=torch.float32).view(5, 3)
    specs = [ShardSpec(dim=0, rank=r, size=2, full=5) for r in range(2)]
    slices = [spec.take(full) for spec in specs]
    assert [s.shape for s in slices] == [(3, 3), (3, 3)]
    assert torch.equal(slices[1][2], torch.zeros(3))  # the padding row, at the end of the last rank's slice
    assert torch.equal(specs[0].merge(slices), full) and specs[0].full_shape((3, 3)) == (5, 3)


def test_the_shard_bounds_cover_the_vocabulary_padded_to_a_multiple_of_tp():
    shards = [VocabShard(vocab_size=509, rank=r, size=4) for r in range(4)]
    assert [(s.start, s.end) for s in shards] == [(0, 128), (128, 256), (256, 384), (384, 512)]
    assert shards[0].padded == 512 and shards[3].spec() == ShardSpec(dim=0, rank=3, size=4, full=509)
    assert VocabShard(vocab_size=512, rank=1, size=4).spec().full == 0  # divisible: no padding recorded


def test_the_manifest_records_the_split_and_its_true_length():
    config = AutoConfig.for_model("gpt2", vocab_size=511, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    layers = layers_for(config, "causal-lm")
    entry = tensor_parallel_entry(layers, 2, vocab_size=511)
    assert entry["splits"]["0"] == {"weight": [0, 1, 511]}  # the tied token embedding, padded to 512
    assert "0" not in tensor_parallel_entry(layers, 2)["splits"]  # replicated


def test_plans_split_the_vocabulary_only_where_the_task_and_head_allow():
    assert plan_pipeline("gpt2", num_stages=2, tp=2).vocab is not None
    assert plan_pipeline("llama", num_stages=2, tp=2, vocab_parallel=False).vocab is None
    assert plan_pipeline("llama", num_stages=2, tp=1).vocab is None
    assert plan_pipeline("bert", num_stages=2, tp=2, task="token-classification").vocab is None
    with pytest.raises(Exception, match="--vocab-parallel: the masked-lm task's loss reads whole logits"):
        plan_pipeline("bert", num_stages=2, tp=2, task="masked-lm", vocab_parallel=True)
    config = get_family("llama").small_config()
    config.vocab_size = 3
    assert "leaves tp rank 3 no row" in vocab_parallel_problem(config, "causal-lm", layers_for(config, "causal-lm"), 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 7.0])
def test_the_loss_on_one_shard_is_hugging_faces(dtype, num_items):
    """tp=1 (no group): the shifted, -100-masked, fp32 cross-entropy, mean or summed over num_items_in_batch."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 50, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (2, 6), generator=gen)
    labels[0, 2] = -100
    ours = vocab_parallel_causal_lm_loss(
        logits, labels, shard=VocabShard(vocab_size=50, rank=0, size=1), num_items_in_batch=num_items
    )
    (grad_ours,) = torch.autograd.grad(ours, logits)
    theirs = ForCausalLMLoss(logits, labels, vocab_size=50, num_items_in_batch=num_items)
    (grad_theirs,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_ours.float(), grad_theirs.float(), rtol=1e-5, atol=1e-6)


def test_sequence_parallelism_is_refused_where_it_was_not_checked():
    from pptk.parallel.activations import BlockShape, block_bytes_per_token
    from pptk.parallel.sequence_parallel import sequence_parallel_problem

    with pytest.raises(Exception, match="--sequence-parallel: it needs --tp > 1"):
        plan_pipeline("llama", num_stages=2, tp=1, sequence_parallel=True)
    assert "bert does not take it" in sequence_parallel_problem("bert", tp=2, vocab_split=False, task="masked-lm")
    with pytest.raises(Exception, match="the LM head must be split by vocabulary"):
        plan_pipeline("llama", num_stages=2, tp=2, vocab_parallel=False, sequence_parallel=True)
    assert plan_pipeline("qwen3", num_stages=2, tp=2, sequence_parallel=True).sequence_parallel
    assert sequence_parallel_problem("gpt2", tp=4, vocab_split=True, task="causal-lm") is None
    # the forecast: the norms' and residual's bytes split tp ways, the two gathered block inputs and cos/sin whole
    shape = BlockShape("rms_swiglu", hidden=8, heads=2, kv_heads=2, head_dim=4, intermediate=16, vocab=32)
    whole = block_bytes_per_token(shape, seq_len=4, precision="bf16", tp=2)
    chunked = block_bytes_per_token(shape, seq_len=4, precision="bf16", tp=2, sequence_parallel=True)
    replicated = 4 * (2 * 8 + 2) + 2 * (4 * 8 + 2 * 4)  # fp32 norm inputs and rsqrt; bf16 norm outputs, cos/sin
    gathered = 2 * (2 * 8 + 2 * 4)
    assert whole - chunked == pytest.approx((replicated - gathered) / 2)
