# Issue 22's heads through the real pipeline engine. One verify launch of 2 ranks checks decoder sequence
# classification (llama, qwen3, gpt2) and the reward loss on pairs against Hugging Face at pp=2 in fp32 and bf16, and
# how verify treats a head the checkpoint lacks. One run of recipes/reward.py trains a small LLaMA on pairs it can
# learn: held-out pairwise accuracy rises, the untrained evaluation is the Bradley-Terry loss of the plain Hugging Face
# model on the same pairs, and the export loads as a one-label sequence classifier that scores as the pipeline did.
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_recipe

pytestmark = pytest.mark.dist

PARITY = {
    (task, model, precision)
    for task, models in (("sequence-classification", ("llama", "qwen3", "gpt2")), ("reward", ("llama",)))
    for model in models
    for precision in ("fp32", "bf16")
}


CAUSAL_LM_START = ("sequence-classification", "llama", "fp32")


def _llama_causal_lm(path: Path) -> Path:
    """A small LlamaForCausalLM checkpoint, untied, so it holds lm_head.weight."""
    from transformers import LlamaForCausalLM

    from pptk.models import get_family

    config = get_family("llama").small_config()
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def verified(tmp_path_factory):
    """{key: VerifyResult} from one launch of 2 ranks. LLaMA's fp32 classifier starts from a causal-LM checkpoint
    (lm_head.weight, no score.weight): Hugging Face initialises the head freshly and drops the LM head."""
    from pptk.verify.run import VerifyJob, verify_many

    work = tmp_path_factory.mktemp("heads")
    causal_lm = _llama_causal_lm(work / "causal")
    jobs = {
        key: VerifyJob(
            causal_lm if key == CAUSAL_LM_START else key[1],
            task=key[0],
            precision=key[2],
            seq_len=16,
            micro_batch_size=4,  # two pairs per micro-batch for the reward jobs
        )
        for key in sorted(PARITY)
    }
    return dict(zip(jobs, verify_many(list(jobs.values()), pp=2, workdir=work / "verify")))


@pytest.mark.parametrize("key", sorted(PARITY), ids="-".join)
def test_classifier_and_reward_steps_equal_hugging_face_at_pp2(verified, key):
    task, _model, precision = key
    result = verified[key]
    assert result.passed, result.describe()
    assert (result.task, result.precision, result.pp) == (task, precision, 2)
    assert result.stages[-1][-1].endswith("ScoreHeadPipe")  # the head sits on the last stage, after the norm
    assert result.params_pipeline == result.params_reference
    if precision == "fp32":
        assert result.loss_rel_diff <= 1e-5 and result.max_param_diff <= 1e-5
    else:
        assert result.max_param_diff <= 4 and result.loss_noise_units <= 4


def test_a_head_the_checkpoint_never_had_passes_and_is_named(verified):
    result = verified[CAUSAL_LM_START]
    assert result.passed, result.describe()  # without allow_missing
    assert result.fresh_heads == ["score.weight"] and result.dropped_heads == ["lm_head.weight"]
    text = result.describe()
    assert "freshly initialised (the checkpoint has no sequence-classification head" in text
    assert "score.weight" in text and "unused (the checkpoint's own task head): lm_head.weight" in text
    as_json = json.loads(result.to_json())
    assert as_json["fresh_heads"] == ["score.weight"] and as_json["passed"] is True
    assert all(not verified[key].fresh_heads for key in PARITY - {CAUSAL_LM_START})  # random models have every head


# --- a reward model learns ------------------------------------------------------------------------------------------

GOOD = ("clear", "useful", "correct", "simple", "exact", "valid", "careful", "precise")
BAD = ("broken", "wrong", "empty", "invalid", "missing", "unknown", "failed", "corrupt")
FILLER = ("the", "file", "list", "value", "name", "object", "module", "string", "number", "line", "text", "data")


def preference_pairs(count: int, *, seed: int) -> list[dict]:
    """Pairs a small model can learn: the chosen answer has a word of GOOD where the rejected one, otherwise the
    same, has a word of BAD. Untrained, the two score alike (accuracy near chance); the rule is a bag of words."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        words = [str(w) for w in rng.choice(FILLER, size=4)]
        good, bad = str(rng.choice(GOOD)), str(rng.choice(BAD))
        answer = f"The {words[0]} {words[1]} is {{}} and {words[2]}."
        pairs.append(
            {"prompt": f"Describe the {words[3]}.", "chosen": answer.format(good), "rejected": answer.format(bad)}
        )
    return pairs


@pytest.fixture(scope="module")
def reward_setup(tmp_path_factory) -> dict:
    """A small random LLaMA reward model (score head included, so both sides start from the same weights) with a
    ChatML tokenizer, and pair files."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from pptk.data.demo_chat import demo_chat_tokenizer

    work = tmp_path_factory.mktemp("reward")
    tokenizer = demo_chat_tokenizer(work / "tokenizer")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    train, held_out = work / "train.jsonl", work / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(128, seed=1)))
    held_out.write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(48, seed=2)))
    return {"model": work / "model", "train": train, "eval": held_out, "tokenizer": tokenizer}


SEQ_LEN, SEED, MICRO, ACCUM = 48, 7, 8, 2


@pytest.fixture(scope="module")
def reward_run(reward_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward-run")
    args = [
        *("--model", str(reward_setup["model"]), "--train", str(reward_setup["train"])),
        *("--eval", str(reward_setup["eval"]), "--seq-len", str(SEQ_LEN), "--seed", str(SEED)),
        *("--micro-batch-size", str(MICRO), "--grad-accum-steps", str(ACCUM), "--epochs", "1", "--lr", "3e-3"),
        *("--no-dropout", "--log-every", "1", "--eval-at-start", "--export-hf", str(out / "hf")),
    ]
    run = run_recipe("reward.py", args, output_dir=out)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"out": out, "summary": summary, "metrics": metrics, "stdout": run.stdout}


def test_held_out_pairwise_accuracy_rises(reward_run):
    evaluations = reward_run["summary"]["evaluations"]
    before, after = evaluations[0], evaluations[-1]
    assert before["step"] == 0 and after["step"] == 8  # 1 epoch of 128 pairs / (8 x 2) per step
    assert before["eval_pairs"] == after["eval_pairs"] == 48
    assert after["eval_accuracy"] >= 0.9 and after["eval_accuracy"] >= before["eval_accuracy"] + 0.2, evaluations
    assert after["eval_margin"] > before["eval_margin"] and after["eval_loss"] < before["eval_loss"]


def _hf_rewards(model, encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's (chosen, rejected) rewards from the plain Hugging Face classifier, one row at a time (no padding)."""
    rewards = []
    with torch.no_grad():
        for pair in encoded:
            for ids in (pair.chosen_ids, pair.rejected_ids):
                rewards.append(model(input_ids=torch.tensor([ids])).logits[0, 0].float())
    stacked = torch.stack(rewards)
    return stacked[0::2], stacked[1::2]


def test_untrained_evaluation_is_hugging_faces_bradley_terry_loss(reward_setup, reward_run):
    """The step-0 evaluation at pp=2 (6 micro-batches of 8 pairs, rows interleaved and padded) against
    -logsigmoid(r_chosen - r_rejected) of the plain Hugging Face classifier on the same pairs, one row at a time."""
    from transformers import AutoModelForSequenceClassification

    from pptk.data.pairs import encode_pairs, read_pairs
    from pptk.tasks.metrics import pair_metrics

    model = AutoModelForSequenceClassification.from_pretrained(reward_setup["model"]).eval()
    encoded = encode_pairs(read_pairs(reward_setup["eval"]), reward_setup["tokenizer"], seq_len=SEQ_LEN)
    chosen, rejected = _hf_rewards(model, encoded)
    before = reward_run["summary"]["evaluations"][0]
    loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean().item()
    assert before["eval_loss"] == pytest.approx(loss, rel=1e-5)
    scores = pair_metrics(chosen.tolist(), rejected.tolist())
    assert before["eval_accuracy"] == scores["accuracy"] and 0.2 <= scores["accuracy"] <= 0.7  # untrained: chance
    assert before["eval_margin"] == pytest.approx(scores["margin"], abs=1e-5)


def test_export_is_a_one_label_classifier_scoring_as_the_pipeline_did(reward_setup, reward_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pptk.data.pairs import encode_pairs, read_pairs
    from pptk.models.heads import bradley_terry_loss
    from pptk.tasks.metrics import pair_metrics

    export = reward_run["out"] / "hf"
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    encoded = encode_pairs(read_pairs(reward_setup["eval"]), tokenizer, seq_len=SEQ_LEN)
    chosen, rejected = _hf_rewards(model, encoded)
    scores = pair_metrics(chosen.tolist(), rejected.tolist())
    last = reward_run["summary"]["evaluations"][-1]
    assert scores["accuracy"] == last["eval_accuracy"]
    assert scores["margin"] == pytest.approx(last["eval_margin"], abs=1e-4)
    labels = torch.tensor([1, 0] * len(encoded))
    logits = torch.stack([chosen, rejected], dim=1).reshape(-1, 1)
    assert float(bradley_terry_loss(logits, labels)) == pytest.approx(last["eval_loss"], abs=1e-4)
