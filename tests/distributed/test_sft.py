# Instruction tuning through recipes/sft.py on CPU ranks: the first step's loss equals the plain Hugging Face model's
# answer-token mean over the same conversations (pp=2, pp=2 x tp=2 with sequence parallelism, bf16), held-out
# answer loss drops, the export loads in transformers and answers, and a resume continues the curve exactly.
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_recipe

from pptk.data.demo_chat import CHATML, demo_chat_tokenizer, demo_conversations
from pptk.data.sft import load_sft_data

pytestmark = pytest.mark.dist

SEQ_LEN = 96
SEED = 1234
GRAD_ACCUM = 4


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> dict:
    """A small LLaMA (GQA) with a ChatML tokenizer, saved as a Hugging Face directory, and train/eval files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    work = tmp_path_factory.mktemp("sft")
    tokenizer = demo_chat_tokenizer(work / "tokenizer")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model_dir = work / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train, held_out = work / "train.jsonl", work / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in demo_conversations(160, seed=1)))
    held_out.write_text("".join(json.dumps(r) + "\n" for r in demo_conversations(16, seed=2)))
    return {"model": model_dir, "train": train, "eval": held_out, "tokenizer": tokenizer}


def _args(chat_model: dict, *extra: str) -> list[str]:
    return [
        *("--model", str(chat_model["model"]), "--train", str(chat_model["train"]), "--eval", str(chat_model["eval"])),
        *("--seq-len", str(SEQ_LEN), "--micro-batch-size", "2", "--grad-accum-steps", str(GRAD_ACCUM)),
        *("--no-dropout", "--log-every", "1", "--seed", str(SEED), *extra),
    ]


def _metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(out_dir) if "loss" in r}


def _hf_first_step_loss(chat_model: dict, *, dp: int = 1, dtype=torch.float32) -> float:
    """The plain Hugging Face model's loss over the first step's rows, conversation by conversation (no packing):
    the sum of answer-token cross-entropies over their count, as HF's Trainer computes with num_items_in_batch."""
    from transformers import AutoModelForCausalLM

    data = load_sft_data([chat_model["train"]], tokenizer=chat_model["tokenizer"], seq_len=SEQ_LEN, seed=SEED)
    rows = data.train
    order = np.random.default_rng([SEED, 0]).permutation(len(rows))
    step_rows = order[: 2 * GRAD_ACCUM * dp]  # the sampler's first global step (pptk.data.sampler)
    model = AutoModelForCausalLM.from_pretrained(chat_model["model"], torch_dtype=dtype).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in step_rows:
            for c in rows.rows[row]:
                conversation = rows.conversations[c]
                ids = torch.from_numpy(conversation.input_ids.astype(np.int64))[None]
                labels = ids.masked_fill(~torch.from_numpy(conversation.supervised)[None], -100)
                logits = model(ids).logits.float()
                token_losses = torch.nn.functional.cross_entropy(
                    logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum"
                )
                total += float(token_losses)
                count += int((labels[0, 1:] != -100).sum())
    return total / count


@pytest.fixture(scope="module")
def learning_run(chat_model, tmp_path_factory):
    """pp=2 fp32: 40 steps with evaluation at the start and every 20 steps, a checkpoint at 20, the export."""
    out = tmp_path_factory.mktemp("sft-run")
    args = _args(chat_model, "--max-steps", "40", "--eval-every", "20", "--save-every", "20", "--eval-at-start")
    run = run_recipe("sft.py", [*args, "--lr", "3e-3", "--export-hf", str(out / "hf")], output_dir=out)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, run


def test_first_step_loss_is_hugging_faces_answer_token_mean_at_pp2(chat_model, learning_run):
    out, _ = learning_run
    assert _losses(out)[1] == pytest.approx(_hf_first_step_loss(chat_model), rel=1e-5)


def test_held_out_answer_loss_drops_and_steps_log_their_tokens(learning_run):
    out, _ = learning_run
    evaluations = [r for r in _metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 20, 40]
    assert evaluations[-1]["eval_loss"] < 0.7 * evaluations[0]["eval_loss"]
    steps = [r for r in _metrics(out) if "loss" in r]
    assert all(r["supervised_tokens"] > 0 and 0 <= r["padding_fraction"] < 1 for r in steps)
    assert len({r["supervised_tokens"] for r in steps}) > 1  # uneven answers: the normaliser changes per step


def test_export_carries_the_template_and_answers_in_transformers(chat_model, learning_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, run = learning_run
    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    assert tokenizer.chat_template == CHATML
    AutoModelForCausalLM.from_pretrained(out / "hf")
    summary = json.loads((out / "summary.json").read_text())
    samples = summary["samples"]  # held-out prompts, answered by the export through its chat template
    assert len(samples) == 3 and all(s["answer"].strip() for s in samples)
    assert f"prompt: {samples[1]['prompt']} | answer: " in run.stdout  # the summary prints the answers


def test_resume_on_one_stage_continues_the_curve(chat_model, learning_run, tmp_path):
    out, _ = learning_run
    resumed = tmp_path / "resumed"
    args = _args(chat_model, "--max-steps", "40", "--eval-every", "100", "--save-every", "100", "--lr", "3e-3")
    run = run_recipe(
        "sft.py",
        [*args, "--resume-from", str(out / "checkpoints" / "step20"), "--pp", "1"],
        output_dir=resumed,
        launcher=["--num_gpus", "1"],
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    original, again = _losses(out), _losses(resumed)
    assert sorted(again) == list(range(21, 41))
    for step in again:
        assert again[step] == pytest.approx(original[step], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(
    ("layout", "precision"),
    # pp=2 x tp=2: the vocabulary split (SFT's loss over num_items_in_batch) and sequence parallelism on packed rows
    [(["--pp", "2", "--tp", "2", "--sequence-parallel"], "fp32"), (["--pp", "2"], "bf16")],
    ids=["pp2xtp2-sequence-parallel", "bf16"],
)
def test_first_step_loss_matches_hugging_face_on_other_layouts(chat_model, tmp_path, layout, precision):
    extra = ["--ds-config", "bf16"] if precision == "bf16" else []
    ranks = "4" if "--tp" in layout else "2"
    run = run_recipe(
        "sft.py",
        [*_args(chat_model, "--max-steps", "1", "--eval-every", "100", *layout, *extra)],
        output_dir=tmp_path,
        launcher=["--num_gpus", ranks],
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    expected = _hf_first_step_loss(chat_model, dtype=dtype)
    tolerance = 1e-5 if precision == "fp32" else 2e-2  # bf16: both sides round every product to 8 bits
    assert _losses(tmp_path)[1] == pytest.approx(expected, rel=tolerance)
