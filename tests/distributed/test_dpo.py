# DPO through recipes/dpo.py on CPU ranks: the reference pass (1F1B and DualPipeV, LoRA adapters disabled and full
# weights) equals the plain Hugging Face model's summed answer log-probabilities, the held-out DPO loss and rewards of
# the trained pipeline equal TRL's formula on the export against the start model (fp32 LoRA at pp=2, bf16 at pp=2 x
# tp=2), and a run learns.
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, run_recipe

from pptk.data.demo_chat import demo_chat_tokenizer
from pptk.data.pairs import encode_pairs, read_pairs
from pptk.tasks.dpo_loss import METRICS, answer_logps, dpo_terms

pytestmark = pytest.mark.dist

SEQ_LEN = 48
SEED = 1234
BETA = 0.1


def preference_records(count: int, *, seed: int) -> list[dict]:
    """Arithmetic questions: the chosen answer is right, the rejected one off by a few (TRL's standard format)."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(count):
        a, b = (int(x) for x in rng.integers(1, 50, size=2))
        wrong = a + b + int(rng.choice([-3, -2, -1, 1, 2, 3]))
        records.append(
            {"prompt": f"What is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.", "rejected": f"It is {wrong}."}
        )
    return records


@pytest.fixture(scope="module")
def pair_model(tmp_path_factory) -> dict:
    """A small LLaMA (GQA) with a ChatML tokenizer, saved as a Hugging Face directory, and train/eval pair files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    work = tmp_path_factory.mktemp("dpo")
    tokenizer = demo_chat_tokenizer(work / "tokenizer")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model_dir = work / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train, held_out = work / "train.jsonl", work / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in preference_records(64, seed=1)))
    held_out.write_text("".join(json.dumps(r) + "\n" for r in preference_records(8, seed=2)))
    return {"model": model_dir, "train": train, "eval": held_out, "tokenizer": tokenizer}


def _args(pair_model: dict, *extra: str) -> list[str]:
    return [
        *("--model", str(pair_model["model"]), "--train", str(pair_model["train"]), "--eval", str(pair_model["eval"])),
        *("--seq-len", str(SEQ_LEN), "--micro-batch-size", "2", "--no-dropout", "--log-every", "1"),
        *("--seed", str(SEED), "--beta", str(BETA), *extra),
    ]


def _metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _hf_logps(model_dir: Path, pair_model: dict, *, dtype=torch.float32) -> np.ndarray:
    """[pairs, 2]: the plain Hugging Face model's summed answer log-probabilities of every train then eval pair, one
    unpadded sequence at a time."""
    from transformers import AutoModelForCausalLM

    tokenizer = pair_model["tokenizer"]
    pairs = read_pairs([pair_model["train"]]) + read_pairs([pair_model["eval"]])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    values = []
    with torch.no_grad():
        for pair in encode_pairs(pairs, tokenizer, seq_len=SEQ_LEN):
            row = []
            for ids, mask in (
                (pair.chosen_ids, pair.chosen_answer_mask),
                (pair.rejected_ids, pair.rejected_answer_mask),
            ):
                ids_t = torch.tensor([ids])
                targets = ids_t.masked_fill(torch.tensor([mask]) == 0, -100)
                total, _ = answer_logps(model(ids_t).logits, targets)
                row.append(float(total[0]))
            values.append(row)
    return np.asarray(values)


def _run(pair_model: dict, out: Path, *extra: str, ranks: int = 2) -> None:
    launcher = ["--num_gpus", str(ranks), "--master_port", str(free_port())]
    run = run_recipe("dpo.py", [*_args(pair_model, *extra)], output_dir=out, launcher=launcher)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


RUNS = {
    # pp=2 fp32 LoRA under DualPipeV: 12 steps of 4 micro-batches of 2 pairs, evaluated at the start and the end
    "fp32-lora-dualpipev": (
        *(2, "--max-steps", "12", "--grad-accum-steps", "4", "--schedule", "dualpipev", "--eval-at-start"),
        *("--lora-r", "8"),
    ),
    # pp=2 x tp=2 bf16 under 1F1B: 3 steps (the first at warmup's lr 0), evaluated at the end
    "bf16-pp2xtp2": (
        *(4, "--max-steps", "3", "--warmup-steps", "1", "--grad-accum-steps", "2", "--tp", "2"),
        *("--ds-config", "bf16"),
    ),
}
DTYPES = {"fp32-lora-dualpipev": torch.float32, "bf16-pp2xtp2": torch.bfloat16}
# bf16: both sides round every product to 8 bits; the sums run over ~20 answer tokens
LOGP_TOLERANCE = {"fp32-lora-dualpipev": {"rtol": 1e-5, "atol": 1e-4}, "bf16-pp2xtp2": {"rtol": 1e-3, "atol": 0.05}}


@pytest.fixture(scope="module")
def runs(pair_model, tmp_path_factory) -> dict[str, Path]:
    """Both launches, shared by every test here; each exports its trained model."""
    done = {}
    for name, (ranks, *extra) in RUNS.items():
        out = tmp_path_factory.mktemp(f"dpo-{name}")
        _run(
            pair_model, out, *extra, "--eval-every", "100", "--lr", "3e-3", "--export-hf", str(out / "hf"), ranks=ranks
        )
        done[name] = out
    return done


@pytest.mark.parametrize("name", list(RUNS))
def test_reference_pass_is_hugging_faces_answer_log_probs(pair_model, runs, name):
    out = runs[name]
    stored = np.load(out / "reference_logps" / "reference_logps.npy")
    expected = _hf_logps(pair_model["model"], pair_model, dtype=DTYPES[name])
    np.testing.assert_allclose(stored, expected, **LOGP_TOLERANCE[name])
    fingerprint = json.loads((out / "reference_logps" / "fingerprint.json").read_text())
    path = "base model: LoRA adapters disabled" if "lora" in name else "start weights"
    assert fingerprint["computed_with"] == f"{path}, one forward pass"
    assert fingerprint["precision"] == ("bf16" if "bf16" in name else "fp32")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dpo_reference"] == f"{path}, one forward pass"


@pytest.mark.parametrize("name", list(RUNS))
def test_held_out_dpo_loss_is_trls_formula_on_the_export(pair_model, runs, name):
    """The pipeline's last evaluation (trained policy vs stored reference) equals the formula on the plain Hugging
    Face export against the start model: policy and reference differ, so the loss is away from log 2."""
    out, dtype = runs[name], DTYPES[name]
    n_train = 64
    policy = _hf_logps(out / "hf", pair_model, dtype=dtype)[n_train:]
    reference = np.load(out / "reference_logps" / "reference_logps.npy")[n_train:]
    encoded = encode_pairs(read_pairs([pair_model["eval"]]), pair_model["tokenizer"], seq_len=SEQ_LEN)
    counts = torch.tensor([[sum(p.chosen_answer_mask[1:]), sum(p.rejected_answer_mask[1:])] for p in encoded])
    terms = dpo_terms(
        torch.from_numpy(policy).reshape(-1),
        torch.from_numpy(reference).reshape(-1),
        counts.reshape(-1),
        beta=BETA,
        loss_type="sigmoid",
    )
    last = [r for r in _metrics(out) if "eval_loss" in r][-1]
    assert abs(last["eval_loss"] - np.log(2)) > 0.05
    tolerance = {"rel": 1e-4, "abs": 1e-5} if dtype == torch.float32 else {"rel": 1e-2, "abs": 2e-3}
    assert last["eval_loss"] == pytest.approx(float(terms["losses"].mean()), **tolerance)
    for metric in METRICS:
        assert last[f"eval_{metric}"] == pytest.approx(float(terms[metric].mean()), **tolerance), metric


def test_margins_grow_and_held_out_chosen_answers_gain(runs):
    records = _metrics(runs["fp32-lora-dualpipev"])
    evaluations = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 12]
    start, end = evaluations
    assert start["eval_loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy = reference at the start
    assert start["eval_rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert end["eval_loss"] < start["eval_loss"] - 0.1
    # held-out chosen answers gained likelihood relative to the rejected ones (the margin is exactly that, x beta)
    assert end["eval_rewards/margins"] > 0.3 and end["eval_rewards/accuracies"] >= 0.75
    steps = [r for r in records if "loss" in r]
    assert all(set(METRICS) <= set(r) for r in steps)
    first, last = (np.mean([r["rewards/margins"] for r in part]) for part in (steps[:3], steps[-3:]))
    assert last > first + 0.2
