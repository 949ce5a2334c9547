# --document-masking in one process: packed documents through the pipeline layers equal Hugging Face run on each
# document alone (logits, loss and gradients), in fp32 and bf16, for GPT-2 and a Llama-like decoder.
import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from pptk.parallel.hf_weights import hf_names
from pptk.parallel.pipeline import build_sequential_module, plan_pipeline, resolve_model
from pptk.tasks.causal_lm import lm_batch

EOS = 0
CONFIGS = {
    "gpt2": GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0),
    "llama": LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
    ),
}


def packed_block():
    """Two rows of 24 tokens: documents of 6, 9 and a 9-token tail; and a tail of 4, then 20 of a new document."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 256, (2, 24), generator=gen)
    ids[0, [5, 14]] = EOS
    ids[1, 3] = EOS
    return ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_packed_documents_match_hugging_face_document_by_document(tmp_path, family, dtype):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS[family]).save_pretrained(tmp_path)
    plan = plan_pipeline(resolve_model(tmp_path), num_stages=1, dropout=False, attn_implementation="sdpa")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, config=plan.config, dtype=dtype).train()
    pipe = build_sequential_module(plan).to(dtype).train()

    ids = packed_block()
    (input_ids, mask, positions), labels = lm_batch(ids, eos_id=EOS)
    logits = pipe((input_ids, mask, positions))
    loss = plan.loss_fn()(logits.float(), labels)
    loss.backward()

    # Hugging Face, one document at a time: the same logits, and the loss over every predicted token
    total, count = torch.zeros(()), 0
    for row in range(ids.shape[0]):
        starts = [*(positions[row] == 0).nonzero().flatten().tolist(), ids.shape[1]]
        for begin, end in itertools.pairwise(starts):
            doc = ids[row : row + 1, begin:end]
            out = hf(input_ids=doc)
            tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(logits[row : row + 1, begin:end], out.logits, **tol)
            if end - begin > 1:
                shifted = out.logits[0, :-1].float()
                total = total + torch.nn.functional.cross_entropy(shifted, doc[0, 1:], reduction="sum")
                count += end - begin - 1
    expected = total / count
    torch.testing.assert_close(loss, expected, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=0)
    expected.backward()
    hf_params = dict(hf.named_parameters())
    names = hf_names(pipe, plan.layers)
    for key, param in pipe.named_parameters():
        reference = hf_params[names[key]].grad.float()
        tol = 1e-5 if dtype == torch.float32 else 2e-2 * float(reference.norm()) + 1e-3
        assert float((param.grad.float() - reference).abs().max()) <= tol, key


def test_without_document_masking_documents_see_each_other(tmp_path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS["gpt2"]).save_pretrained(tmp_path)
    plan = plan_pipeline(resolve_model(tmp_path), num_stages=1, dropout=False)
    pipe = build_sequential_module(plan).eval()
    ids = packed_block()
    (plain_ids, plain_mask), _ = lm_batch(ids)
    masked = pipe(lm_batch(ids, eos_id=EOS)[0])
    plain = pipe((plain_ids, plain_mask))
    torch.testing.assert_close(masked[0, :6], plain[0, :6])  # the first document sees nothing before it anyway
    assert (masked[0, 6:] - plain[0, 6:]).abs().max() > 1e-3
