# DPO in process: TRL's loss formulas, the answer log-probabilities against Hugging Face's cross-entropy, the loss
# function's modes, the micro-batch layout, the reference cache and its fingerprint, LoRA adapters switched off, and
# every bad input's error from recipes/dpo.py before any rank starts.
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pptk.data.demo_chat import demo_chat_tokenizer
from pptk.errors import PptkError
from pptk.tasks import dpo
from pptk.tasks.dpo_loss import METRICS, DpoLoss, answer_logps, dpo_terms
from pptk.tasks.dpo_reference import ReferenceCache, adapters_disabled

ROOT = Path(__file__).resolve().parents[2]
PAIR = {"prompt": "What is 2 plus 3?", "chosen": "2 plus 3 is 5.", "rejected": "It is 7."}


def _recipe():
    spec = importlib.util.spec_from_file_location("dpo_recipe", ROOT / "recipes" / "dpo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trl_reference(pi_c, pi_r, ref_c, ref_r, *, beta, loss_type):
    """TRL's DPOTrainer.dpo_loss, written out for one pair."""
    logits = (pi_c - pi_r) - (ref_c - ref_r)
    if loss_type == "sigmoid":
        return -np.log(1 / (1 + np.exp(-beta * logits)))
    if loss_type == "hinge":
        return max(0.0, 1 - beta * logits)
    return (logits - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_losses_and_rewards_are_trls(loss_type):
    rng = np.random.default_rng(0)
    policy, reference = -rng.uniform(5, 30, size=8), -rng.uniform(5, 30, size=8)
    counts = rng.integers(3, 12, size=8)
    terms = dpo_terms(
        torch.tensor(policy), torch.tensor(reference), torch.tensor(counts), beta=0.2, loss_type=loss_type
    )
    if loss_type == "ipo":  # TRL averages over the answer tokens for ipo
        policy, reference = policy / counts, reference / counts
    for i in range(4):
        c, r = 2 * i, 2 * i + 1
        expected = trl_reference(policy[c], policy[r], reference[c], reference[r], beta=0.2, loss_type=loss_type)
        assert float(terms["losses"][i]) == pytest.approx(expected, rel=1e-12)
        chosen, rejected = 0.2 * (policy[c] - reference[c]), 0.2 * (policy[r] - reference[r])
        assert float(terms["rewards/chosen"][i]) == pytest.approx(chosen)
        assert float(terms["rewards/margins"][i]) == pytest.approx(chosen - rejected)
        assert float(terms["rewards/accuracies"][i]) == float(chosen > rejected)
    same = dpo_terms(torch.tensor(policy), torch.tensor(policy), torch.tensor(counts), beta=0.2, loss_type="sigmoid")
    assert torch.allclose(same["losses"], torch.full((4,), np.log(2), dtype=torch.float64))


def test_answer_logps_are_minus_hugging_faces_summed_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(4, 10, 17)
    targets = torch.randint(0, 17, (4, 10))
    targets[:, :4] = -100
    targets[2, 6:] = -100
    sums, counts = answer_logps(logits, targets)
    for row in range(4):
        expected = -F.cross_entropy(logits[row, :-1], targets[row, 1:], ignore_index=-100, reduction="sum")
        assert float(sums[row]) == pytest.approx(float(expected), rel=1e-5)
    assert counts.tolist() == [6, 6, 2, 6]


def test_loss_function_modes():
    torch.manual_seed(1)
    logits = torch.randn(6, 8, 11, requires_grad=True)
    targets = torch.randint(0, 11, (6, 8))
    targets[:, :3] = -100
    reference = torch.randn(6, dtype=torch.float64) - 20
    index = torch.tensor([5, 5, 9, 9, -1, -1])  # the last pair only fills the micro-batch
    loss_fn = DpoLoss(beta=0.1, loss_type="sigmoid")
    loss = loss_fn(logits, (targets, reference, index))
    policy, counts = answer_logps(logits, targets)
    expected = dpo_terms(policy[:4], reference[:4], counts[:4], beta=0.1, loss_type="sigmoid")
    assert float(loss.detach()) == pytest.approx(float(expected["losses"].detach().mean()), rel=1e-6)
    loss.backward()
    assert logits.grad is not None and float(logits.grad[4:].abs().sum()) == 0  # the filler pair adds nothing
    window = loss_fn.take_window()
    assert window["count"] == 2 and set(METRICS) <= set(window) and loss_fn.window == {}
    loss_fn.collect_logps = True
    with torch.no_grad():
        assert float(loss_fn((logits,), (targets, reference, index))) == 0
    (rows,) = loss_fn.collected
    assert rows[:, 0].tolist() == [5, 9, -1]
    assert torch.allclose(rows[:, 1:], torch.stack([policy[0::2], policy[1::2]], 1).double().detach())


def test_reference_cache_fingerprint(tmp_path):
    fingerprint = {"data": "a", "model": "m", "seq_len": 64, "precision": "fp32", "pairs": 3}
    cache = ReferenceCache(tmp_path / "cache", fingerprint)
    assert cache.load() is None
    values = np.arange(6, dtype=np.float64).reshape(3, 2)
    cache.save(values, path_used="start weights, one forward pass")
    loaded = cache.load()
    assert isinstance(loaded, np.memmap) and np.array_equal(loaded, values)
    other = ReferenceCache(tmp_path / "cache", {**fingerprint, "model": "n"})
    with pytest.raises(PptkError, match=r"computed for other inputs: model \('m' there, 'n' here\); delete it"):
        other.load()
    assert other.load(replace_stale=True) is None


def test_adapters_disabled_gives_the_base_model_and_keeps_what_trains():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(3, 8)
    expected = base(x)
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "2"]), base)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # a trained adapter: it changes the output
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    adapted = model(x)
    assert not torch.allclose(adapted, expected)
    with adapters_disabled(model):
        assert torch.allclose(model(x), expected)
    assert torch.allclose(model(x), adapted)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable


# ------------------------------------------------------------------------------------------- the recipe's inputs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    work = tmp_path_factory.mktemp("dpo-unit")
    tokenizer = demo_chat_tokenizer(work / "tokenizer")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    return work / "model"


def prepare(model_dir: Path, tmp_path: Path, records: list[dict], *extra: str):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["--model", str(model_dir), "--train", str(data), "--output-dir", str(tmp_path / "out"), "--seq-len", "48"]
    run, prepare_task = _recipe().build([*args, *extra])
    return prepare_task(run)


def test_micro_batches_interleave_whole_pairs(model_dir, tmp_path):
    task = prepare(model_dir, tmp_path, [PAIR, {**PAIR, "rejected": "Seven."}])
    task.reference = np.array([[-1.0, -2.0], [-3.0, -4.0]])
    (input_ids, attention, positions), (targets, reference, index) = task.batch([1, -1])
    assert input_ids.shape == targets.shape == (4, 48) and index.tolist() == [1, 1, -1, -1]
    assert reference.tolist() == [-3.0, -4.0, 0.0, 0.0]
    for row, (ids, mask) in enumerate(
        [(task.train[1].chosen_ids, task.train[1].chosen_answer_mask), (task.train[1].rejected_ids, None)]
    ):
        n = len(ids)
        assert input_ids[row, :n].tolist() == ids and attention[row].sum() == n
        assert (input_ids[row, n:] == task.pad_id).all() and (targets[row, n:] == -100).all()
        if mask is not None:
            assert targets[row, :n].tolist() == [t if m else -100 for t, m in zip(ids, mask)]
    assert positions[0].tolist() == list(range(48))
    assert task.num_train_examples == 2 and task.tokens_per_example() == 96


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"prompt": "hi", "chosen": "a"}, r"pairs\.jsonl:2: no 'rejected' field"),
        (
            {"prompt": "hi", "chosen": "same", "rejected": "same"},
            r"pairs\.jsonl:2: 'chosen' and 'rejected' are identical",
        ),
        ({**PAIR, "prompt": "a very long question " * 20}, r"pairs\.jsonl:2: the prompt alone is \d+ tokens"),
    ],
)
def test_bad_pairs_fail_before_ranks_start(model_dir, tmp_path, record, expected):
    with pytest.raises(PptkError, match=expected):
        prepare(model_dir, tmp_path, [PAIR, record])


def test_a_reference_cache_for_other_inputs_is_refused(model_dir, tmp_path):
    task = prepare(model_dir, tmp_path, [PAIR])
    task.cache.save(np.zeros((1, 2)), path_used="start weights, one forward pass")
    again = prepare(model_dir, tmp_path, [PAIR])
    assert again.reference is not None and again.reference_path.startswith("cache ")
    with pytest.raises(PptkError, match=r"reference cache .* was computed for other inputs: data \("):
        prepare(model_dir, tmp_path, [{**PAIR, "chosen": "Five."}])
    with pytest.raises(PptkError, match=r"other inputs: seq_len \(48 there, 40 here\)"):
        prepare(model_dir, tmp_path, [PAIR], "--seq-len", "40")
    # --overwrite starts over: the stale cache in the output directory is recomputed, not refused
    assert prepare(model_dir, tmp_path, [{**PAIR, "chosen": "Five."}], "--overwrite").reference is None
    with pytest.raises(PptkError, match="resuming a DPO run needs the reference log-probabilities"):
        prepare(model_dir, tmp_path, [PAIR], "--resume-from", str(tmp_path), "--reference-cache", str(tmp_path / "x"))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--beta", "0"], "--beta must be positive"),
        (["--eval-fraction", "0.5", "--eval", "x.jsonl"], "hold out either a file or a fraction"),
    ],
)
def test_bad_settings(model_dir, tmp_path, flags, expected):
    with pytest.raises(PptkError, match=expected):
        prepare(model_dir, tmp_path, [PAIR], *flags)


def test_defaults_and_names():
    assert dpo.TASK == "causal-lm" and dpo.DpoSettings(train=()).beta == 0.1
