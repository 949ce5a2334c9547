# Decoder classification heads and reward models in one process: parity with Hugging Face's *ForSequenceClassification
# for every decoder family that has one (score on the last non-pad token), the Bradley-Terry loss, and how verify sorts
# the tensors a checkpoint lacks (a fresh head vs a missing body tensor).
import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from pptk.errors import PptkError
from pptk.models import get_family, supported_model_types
from pptk.models.decoder import has_sequence_classifier
from pptk.models.heads import bradley_terry_loss, config_for_task, infer_task, last_token_problem
from pptk.parallel.hf_weights import hf_names
from pptk.parallel.pipeline import build_sequential_module, plan_pipeline

EAGER_ONLY = {"gemma2", "vaultgemma", "gpt_oss"}  # soft-capping, attention sinks: transformers has no SDPA path
CLASSIFIER_FAMILIES = sorted(t for t in supported_model_types() if "sequence-classification" in get_family(t).tasks)
# The head is one module on top of the family's body, whose parity tests/unit/test_decoder.py checks for every family:
# one family per kind of body is enough here (GQA, q/k norms, GPT-2, scaled embeddings with eager attention, sliding
# window, embedding dropout, mixture of experts with and without shared experts, attention sinks).
PARITY_FAMILIES = ("llama", "qwen3", "gpt2", "gemma2", "mistral", "starcoder2", "mixtral", "deepseek_v3", "gpt_oss")


def test_every_decoder_family_with_a_transformers_classifier_has_the_task():
    decoders = [t for t in supported_model_types() if t != "bert"]
    with_class = sorted(t for t in decoders if has_sequence_classifier(t))
    assert {"llama", "qwen3", "gpt2", "mistral", "mixtral", "gemma2"} <= set(with_class)
    assert sorted(t for t in CLASSIFIER_FAMILIES if t != "bert") == with_class
    assert set(PARITY_FAMILIES) <= set(with_class)
    assert "granite" in decoders and "granite" not in CLASSIFIER_FAMILIES  # transformers has no GraniteFor...
    for model_type in with_class:
        assert {"causal-lm", "sequence-classification", "reward"} <= set(get_family(model_type).tasks)


@pytest.mark.parametrize("model_type", PARITY_FAMILIES)
def test_decoder_classifier_matches_hugging_face(model_type, tmp_path):
    """Logits pooled at each row's last token, loss and every gradient, from a saved Hugging Face classifier."""
    config = get_family(model_type).small_config()
    config.num_labels, config.pad_token_id = 3, 0
    attn = "eager" if model_type in EAGER_ONLY else "sdpa"
    plan = plan_pipeline(config, num_stages=1, task="sequence-classification", attn_implementation=attn, dropout=False)
    torch.manual_seed(0)
    reference = plan.hf_class(plan.config)
    reference.save_pretrained(tmp_path)
    plan = plan_pipeline(tmp_path, num_stages=1, attn_implementation=attn, dropout=False)
    assert plan.task == "sequence-classification"  # read from config.architectures
    pipe = build_sequential_module(plan)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, config.vocab_size, (3, 12), generator=gen)
    attention_mask = (torch.arange(12)[None] < torch.tensor([12, 7, 3])[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = torch.tensor([2, 0, 1])
    reference.train()
    pipe.train()
    out = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    logits = pipe((input_ids, attention_mask))
    plan.loss_fn()(logits, labels).backward()
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-6)
    names = hf_names(pipe, plan.layers)
    hf_params = dict(reference.named_parameters())
    assert sorted(names[key] for key, _ in pipe.named_parameters()) == sorted(hf_params)
    for key, param in pipe.named_parameters():
        torch.testing.assert_close(param.grad, hf_params[names[key]].grad, rtol=0, atol=1e-6, msg=names[key])


def test_the_score_reads_the_last_real_token_wherever_the_row_ends():
    from pptk.models.heads import ScoreHeadPipe

    head = ScoreHeadPipe(4, 1)
    hidden = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    scores = head((hidden, mask, torch.arange(5).repeat(2, 1)))
    torch.testing.assert_close(scores, torch.stack([head.weight @ hidden[0, 2], head.weight @ hidden[1, 4]]))


def test_bradley_terry_loss_is_trls_formula_on_interleaved_rows():
    rewards = torch.tensor([[2.0], [0.5], [-1.0], [0.0], [3.0], [3.0]])
    labels = torch.tensor([1, 0, 1, 0, -100, -100])  # two pairs, then two filler rows of an evaluation
    expected = -torch.nn.functional.logsigmoid(torch.tensor([2.0 - 0.5, -1.0 - 0.0])).mean()
    torch.testing.assert_close(bradley_terry_loss(rewards, labels), expected)
    assert float(bradley_terry_loss(rewards[4:], labels[4:])) == 0.0  # only filler: nothing to score
    with pytest.raises(PptkError, match="1 chosen and 2 rejected rows; each pair must travel whole"):
        bradley_terry_loss(rewards[:3], torch.tensor([1, 0, 0]))


def test_reward_models_have_one_output_and_decoder_classifiers_a_pad_token():
    config = LlamaConfig(eos_token_id=2, pad_token_id=None)
    assert config_for_task(config, "reward").num_labels == 1
    assert config_for_task(config, "sequence-classification").pad_token_id == 2  # eos, as TRL defaults it
    assert config.num_labels == 2 and config.pad_token_id is None  # a copy: the caller's config is untouched
    with pytest.raises(PptkError, match="one output, but config.num_labels is 2; set num_labels=1"):
        plan_pipeline(config, num_stages=1, task="reward")
    assert plan_pipeline(config_for_task(config, "reward"), num_stages=1, task="reward").layers[-1].optional


def test_decoders_still_default_to_causal_lm_and_read_a_classifier_from_the_architectures():
    assert infer_task(LlamaConfig()) == "causal-lm"
    assert infer_task(LlamaConfig(architectures=["LlamaForSequenceClassification"])) == "sequence-classification"
    assert infer_task(LlamaConfig(architectures=["LlamaForCausalLM"]), "reward") == "reward"


def test_hugging_face_would_score_an_earlier_token_when_a_row_ends_with_the_pad_id():
    assert last_token_problem([5, 6, 7], pad_token_id=0, where="a.csv:2") is None
    problem = last_token_problem([5, 6, 0], pad_token_id=0, where="a.csv:3")
    assert problem is not None and problem.startswith("a.csv:3: the last token is the pad token (id 0)")


def _save_llama(path, *, drop: str | None = None):
    from safetensors.torch import load_file, save_file

    config = get_family("llama").small_config()
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    if drop:
        tensors = load_file(path / "model.safetensors")
        del tensors[drop]
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_verify_sorts_a_fresh_head_from_a_missing_body_tensor(tmp_path):
    """The parent's half of `pptk verify` (Hugging Face's own loading report, no ranks): a causal-LM checkpoint
    classified has a fresh score head and an unused LM head; one that also lacks a body tensor fails on it."""
    from pptk.verify.compare import checkpoint_gaps, gap_problems
    from pptk.verify.run import VerifyJob, prepare_jobs

    body = "model.layers.1.mlp.up_proj.weight"
    jobs = [
        VerifyJob(_save_llama(tmp_path / "causal"), task="sequence-classification", seq_len=8, micro_batches=1),
        VerifyJob(_save_llama(tmp_path / "broken", drop=body), task="sequence-classification", seq_len=8),
    ]
    whole, broken = prepare_jobs(jobs, pp=1, work=tmp_path / "work")
    gaps = checkpoint_gaps(whole.plan, whole.reference)
    assert (gaps.fresh, gaps.dropped, gaps.missing, gaps.unexpected) == (["score.weight"], ["lm_head.weight"], [], [])
    assert gap_problems(gaps, allow_missing=False) == []
    gaps = checkpoint_gaps(broken.plan, broken.reference)
    assert gaps.fresh == ["score.weight"] and gaps.missing == [body]
    assert gap_problems(gaps, allow_missing=False) == [
        f"1 tensor(s) missing from the checkpoint: {body} (pass --allow-missing when that is expected)"
    ]
    assert gap_problems(gaps, allow_missing=True) == []
    # the export class a classifier converts to
    assert AutoModelForSequenceClassification._model_mapping[type(whole.plan.config)] is whole.plan.hf_class
