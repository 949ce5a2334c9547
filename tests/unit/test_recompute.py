# Selective checkpointing (pptk.parallel.recompute): a block whose attention is recomputed keeps fewer activations
# for the backward and computes the same gradients, for GPT-2 and LLaMA blocks; the refusals.
import pytest
import torch
from transformers import AutoConfig
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from pptk.errors import PptkError
from pptk.parallel.pipeline import plan_pipeline
from pptk.parallel.recompute import attention_modules, check_one_checkpointing, recompute_attention


def _saved_bytes_and_grads(block, run):
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    torch.manual_seed(1)  # GPT-2 has dropout on: the recomputed attention must draw the same mask
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(block)
    out.float().pow(2).sum().backward()
    return sum(saved), {n: p.grad.clone() for n, p in block.named_parameters()}


def _gpt2():
    config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=1, n_head=4, n_positions=32)
    config._attn_implementation = "eager"
    hidden = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    return GPT2Block(config, layer_idx=0), lambda block: block(hidden)


def _llama():
    config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
    )
    config._attn_implementation = "sdpa"
    hidden = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, -1)
    tables = LlamaRotaryEmbedding(config)(hidden, positions)
    return LlamaDecoderLayer(config, 0), lambda block: block(hidden, position_embeddings=tables)


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_recomputed_attention_keeps_less_and_gives_the_same_gradients(make):
    torch.manual_seed(0)
    block, run = make()
    kept, grads = _saved_bytes_and_grads(block, run)
    block.zero_grad()
    recompute_attention(block)
    kept_selective, grads_selective = _saved_bytes_and_grads(block, run)
    assert kept_selective < 0.8 * kept, (kept_selective, kept)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_selective[name], grad, rtol=0, atol=0, msg=name)


def test_the_attention_module_is_the_outermost_and_the_refusals_name_the_fix():
    block, _ = _gpt2()
    assert [type(m).__name__ for m in attention_modules(block)] == ["GPT2Attention"]
    with pytest.raises(PptkError, match="has no attention module"):
        recompute_attention(torch.nn.Linear(2, 2))
    with pytest.raises(PptkError, match="choose one"):
        check_one_checkpointing(selective=True, interval=1)
    check_one_checkpointing(selective=False, interval=1)
    assert plan_pipeline("llama", num_stages=2, recompute_attention=True).recompute_attention
