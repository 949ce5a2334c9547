# Short evaluation micro-batches filled to the micro-batch size (DualPipeV sends shapes once): the filler rows are
# never scored, so loss, accuracy, F1, seqeval and perplexity equal the unfilled computation, in process.
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertTokenizerFast

from pptk.data.encode import (
    IGNORE,
    encode_classification,
    encode_lines,
    encode_tagging,
    fill_rows,
    is_filler,
    pad_batch,
)
from pptk.data.labels import LabelMap
from pptk.data.readers import TaggedSentence, TextExample
from pptk.data.sampler import Shard, eval_indices
from pptk.errors import PptkError
from pptk.models import get_family
from pptk.parallel.pipeline import build_sequential_module, plan_pipeline
from pptk.tasks.classification import PredictionRecorder, gold_and_predicted, report
from pptk.tasks.encoder import eval_micro_batches
from pptk.tasks.masked_lm import MaskingCollator

WORDS = [f"w{i}" for i in range(40)]
SHARD = Shard(dp_rank=0, dp_size=1, micro_batch_size=6)  # 29 examples: micro-batches of 6, 6, 6, 6 and 5


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> BertTokenizerFast:
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


def _sentences(n: int = 29, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[WORDS[k] for k in rng.integers(0, len(WORDS), rng.integers(2, 12))] for _ in range(n)]


def _model(task: str, num_labels: int = 3):
    config = get_family("bert").small_config()
    config.vocab_size, config.num_labels = 64, num_labels
    plan = plan_pipeline(config, num_stages=1, task=task, dropout=False)
    return build_sequential_module(plan, seed=3).eval(), plan


def _unfilled(features, collate) -> list:
    """What 1F1B evaluated before filling: eval_indices' micro-batches as they are."""
    return [
        collate([features[i] for i in chunk]) for chunk in eval_indices([len(f["input_ids"]) for f in features], SHARD)
    ]


def _score(model, plan, batches, names, *, per_token: bool):
    """The classification task's evaluation, in process: mean micro-batch loss, metrics, pairs."""
    recorder = PredictionRecorder(plan.loss_fn())
    with torch.no_grad(), recorder.recording() as records:
        losses = [float(recorder(model(inputs), labels)) for inputs, labels in batches]
    pairs = gold_and_predicted(records, per_token=per_token)
    metrics, _ = report(pairs, LabelMap(names), per_token=per_token)
    return float(np.mean(losses)), metrics, pairs


def test_fill_rows_copies_the_first_example_with_every_label_ignored():
    ids = torch.arange(12).reshape(3, 4)
    (filled_ids, filled_mask), labels = fill_rows(((ids, torch.ones_like(ids)), torch.tensor([2, 0, 1])), rows=5)
    assert filled_mask.shape == (5, 4) and bool(filled_mask.all())
    assert torch.equal(filled_ids[3], ids[0]) and torch.equal(filled_ids[4], ids[0])
    assert labels.tolist() == [2, 0, 1, IGNORE, IGNORE]
    assert is_filler(labels).tolist() == [False, False, False, True, True]
    per_token = torch.tensor([[IGNORE, 3, IGNORE, 1]]).expand(2, 4)
    _, labels = fill_rows(((ids[:2],), per_token), rows=4)
    assert labels.shape == (4, 4) and is_filler(labels).tolist() == [False, False, True, True]
    whole = ((ids,), torch.tensor([0, 1, 2]))
    assert fill_rows(whole, rows=3) is whole


def test_token_classification_scores_the_same_with_filled_micro_batches(tokenizer):
    names = ("O", "B-X", "I-X")
    rng = np.random.default_rng(1)
    sentences = [
        TaggedSentence(tuple(words), tuple(names[k] for k in rng.integers(0, 3, len(words))), f"dev:{i}")
        for i, words in enumerate(_sentences())
    ]
    features = encode_tagging(sentences, tokenizer, LabelMap(names), max_len=32, truncate=False)
    model, plan = _model("token-classification")
    collate = lambda fs: pad_batch(fs, pad_id=tokenizer.pad_token_id)  # noqa: E731
    filled = eval_micro_batches(features, SHARD, collate)
    assert [len(labels) for _, labels in filled] == [6] * 5  # the 5-example one is filled too
    loss, metrics, pairs = _score(model, plan, filled, names, per_token=True)
    want_loss, want_metrics, want_pairs = _score(model, plan, _unfilled(features, collate), names, per_token=True)
    assert len(pairs) == 29 and pairs == want_pairs and metrics == want_metrics
    assert loss == pytest.approx(want_loss, rel=1e-6)


def test_sequence_classification_scores_the_same_with_filled_micro_batches_of_one_length(tokenizer):
    """Under DualPipeV (fixed shapes) every micro-batch is also padded to one length: all share one shape."""
    names = ("neg", "neu", "pos")
    rng = np.random.default_rng(2)
    examples = [TextExample(" ".join(w), names[rng.integers(0, 3)], f"dev:{i}") for i, w in enumerate(_sentences())]
    features = encode_classification(examples, tokenizer, LabelMap(names), max_len=32, truncate=False)
    model, plan = _model("sequence-classification")
    collate = lambda fs: pad_batch(fs, pad_id=tokenizer.pad_token_id, length=16)  # noqa: E731
    filled = eval_micro_batches(features, SHARD, collate, fixed_shape=True)
    assert {(inputs[0].shape, labels.shape) for inputs, labels in filled} == {((6, 16), (6,))}
    loss, metrics, pairs = _score(model, plan, filled, names, per_token=False)
    want_loss, want_metrics, want_pairs = _score(model, plan, _unfilled(features, collate), names, per_token=False)
    assert len(pairs) == 29 and pairs == want_pairs and metrics == want_metrics
    assert loss == pytest.approx(want_loss, rel=1e-6)


def test_masked_lm_masks_the_real_rows_alike_and_its_loss_is_unchanged(tokenizer):
    lines = [(" ".join(words), f"dev:{i}") for i, words in enumerate(_sentences())]
    features = encode_lines(lines, tokenizer, max_len=32, truncate=False)
    model, plan = _model("masked-lm")
    filled = eval_micro_batches(features, SHARD, MaskingCollator(tokenizer, probability=0.3, seed=5))
    unfilled = _unfilled(features, MaskingCollator(tokenizer, probability=0.3, seed=5))
    for ((ids, _, _), labels), ((want_ids, _, _), want_labels) in zip(filled, unfilled, strict=True):
        real = len(want_labels)
        assert len(labels) == 6 and torch.equal(ids[:real], want_ids) and torch.equal(labels[:real], want_labels)
        assert (labels[real:] == IGNORE).all()
    loss_fn = plan.loss_fn()
    with torch.no_grad():
        loss = np.mean([float(loss_fn(model(inputs), labels)) for inputs, labels in filled])
        want = np.mean([float(loss_fn(model(inputs), labels)) for inputs, labels in unfilled])
    assert np.exp(loss) == pytest.approx(np.exp(want), rel=1e-6)  # the perplexity


def test_a_tiny_eval_set_that_dualpipev_cannot_deal_evenly_is_one_clear_error():
    """Micro-batches of 1 and 5 examples over 2 replicas: one replica's single micro-batch holds 2 (equal counts)."""
    features = [{"input_ids": [2, 5 + i, 3], "token_type_ids": [0, 0, 0], "labels": i % 2} for i in range(5)]
    collate = lambda fs: pad_batch(fs, pad_id=0)  # noqa: E731
    first, second = (Shard(dp_rank=r, dp_size=2, micro_batch_size=1) for r in (0, 1))
    assert max(len(labels) for _, labels in eval_micro_batches(features, first, collate)) == 2  # 1F1B: fine
    for shard in (first, second):  # the replica whose micro-batches all fit stops too, rather than waiting
        with pytest.raises(PptkError, match=r"5 evaluation examples cannot be dealt to dp\(2\) replicas .*dualpipev"):
            eval_micro_batches(features, shard, collate, fixed_shape=True)
