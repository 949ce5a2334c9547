# GPT-2 family module, in one process: the pipeline layers compute exactly what Hugging Face computes (pp=1 parity).
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

from pptk.errors import PptkError
from pptk.parallel.hf_weights import hf_names
from pptk.parallel.pipeline import build_sequential_module, plan_pipeline, resolve_model


def _config(**overrides) -> GPT2Config:
    base = dict(vocab_size=512, n_positions=32, n_embd=64, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0)
    return GPT2Config(**(base | overrides))


def _pair(tmp_path, config, *, attn="sdpa"):
    """A Hugging Face model saved to disk and the pipeline layers loaded from that directory."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(config)
    hf.save_pretrained(tmp_path)
    plan = plan_pipeline(resolve_model(tmp_path), num_stages=1, dropout=False, attn_implementation=attn)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path, config=plan.config).train()
    return hf, build_sequential_module(plan).train(), plan


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_loss_and_gradients_match_hugging_face(tmp_path, padded_batch, tied, attn):
    hf, pipe, plan = _pair(tmp_path, _config(tie_word_embeddings=tied), attn=attn)
    ids, mask = padded_batch
    labels = ids.masked_fill(mask == 0, -100)

    expected = hf(input_ids=ids, attention_mask=mask, labels=labels)
    logits = pipe((ids, mask))
    loss = plan.loss_fn()(logits, labels)
    torch.testing.assert_close(logits, expected.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, expected.loss, rtol=1e-6, atol=0)

    expected.loss.backward()
    loss.backward()
    hf_params = dict(hf.named_parameters())
    names = hf_names(pipe, plan.layers)
    for key, param in pipe.named_parameters():
        torch.testing.assert_close(param.grad, hf_params[names[key]].grad, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("tied", [True, False])
def test_parameters_map_one_to_one_onto_hugging_face_names(tmp_path, tied):
    hf, pipe, plan = _pair(tmp_path, _config(tie_word_embeddings=tied))
    names = hf_names(pipe, plan.layers)
    assert sorted(names[k] for k, _ in pipe.named_parameters()) == sorted(n for n, _ in hf.named_parameters())
    assert sum(p.numel() for p in pipe.parameters()) == hf.num_parameters()


def test_padding_changes_nothing_for_real_tokens(tmp_path):
    """Right padding: the logits of a row's real tokens do not depend on what follows them."""
    _, pipe, _ = _pair(tmp_path, _config())
    ids = torch.randint(1, 512, (1, 16))
    short = pipe((ids[:, :9], torch.ones(1, 9, dtype=torch.long)))
    mask = torch.ones(1, 16, dtype=torch.long)
    mask[:, 9:] = 0
    padded = pipe((ids, mask))
    torch.testing.assert_close(padded[:, :9], short, rtol=0, atol=1e-5)


def test_base_model_checkpoint_loads_into_the_lm_pipeline(tmp_path):
    """A checkpoint saved from GPT2Model ("h.0...") loads as well as one from GPT2LMHeadModel ("transformer.h.0...")."""
    config = _config()
    torch.manual_seed(0)
    base = GPT2Model(config)
    base.save_pretrained(tmp_path)
    plan = plan_pipeline(resolve_model(tmp_path), num_stages=1, dropout=False)
    pipe = build_sequential_module(plan)
    state = dict(pipe.named_parameters())
    torch.testing.assert_close(state["tied_modules.word_embeddings.weight"], base.wte.weight)
    torch.testing.assert_close(state["3.attn.c_attn.weight"], base.h[1].attn.c_attn.weight)


def test_from_scratch_initialisation_follows_hugging_face(tmp_path):
    """Random init uses HF's scheme: N(0, 0.02) embeddings, c_proj scaled by 1/sqrt(2 * n_layer), LayerNorm = 1."""
    config = _config(n_layer=8, n_embd=128, vocab_size=4096)
    plan = plan_pipeline(config, num_stages=1)
    pipe = build_sequential_module(plan, seed=7)
    params = dict(pipe.named_parameters())
    assert params["tied_modules.word_embeddings.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert params["2.attn.c_attn.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert params["2.attn.c_proj.weight"].std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.equal(params["2.ln_1.weight"], torch.ones(128))
    again = dict(build_sequential_module(plan, seed=7).named_parameters())
    assert all(torch.equal(params[k], again[k]) for k in params), "init must be deterministic for one seed"


def test_out_of_vocabulary_and_too_long_inputs_are_refused(tmp_path):
    _, pipe, _ = _pair(tmp_path, _config())
    with pytest.raises(PptkError, match=r"token id 512 is outside the vocabulary \[0, 512\)"):
        pipe((torch.tensor([[1, 512]]), torch.ones(1, 2, dtype=torch.long)))
    with pytest.raises(PptkError, match="sequence length 40 is longer than the model's 32 positions"):
        pipe((torch.ones(1, 40, dtype=torch.long), torch.ones(1, 40, dtype=torch.long)))


def test_cross_attention_configs_are_refused():
    with pytest.raises(PptkError, match="add_cross_attention=True"):
        plan_pipeline(_config(add_cross_attention=True), num_stages=1)
