# Fine-tuning data for the encoder recipes: CSV/JSONL/CoNLL readers, label sets, tokenization, padding, batches.
"""What recipes/bert_finetune.py and recipes/bert_mlm.py share, so neither copies the other.

- Readers keep ``file:line`` with every example, so a bad label or a malformed line is reported where it is.
- Label sets come from the data, ``--labels``, or a fine-tuned checkpoint's ``id2label``; any disagreement between
  them (or with ``--num-labels``, or with the checkpoint's classifier shape) is a PptkError before training.
- Truncation is explicit: an example longer than ``max_len`` tokens is an error unless ``truncate`` is set.
- Micro-batches are padded to their own longest sequence (the pipeline runs with ``dynamic_shape=True``).
- ``plan_epochs``/``train_by_epoch``/``write_summary``: an epoch-based run on pptk.train's loop, evaluated after
  every epoch (run one epoch at a time, since the loop has no evaluation hook of its own).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pptk.errors import PptkError

IGNORE = -100  # the label Hugging Face's losses skip: padding, special tokens, non-first sub-tokens
IOB_TAG = re.compile(r"^(O|[BIES]-\S+)$")
DOCSTART = "-DOCSTART-"

Batch = tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # ((ids, mask, types), labels)


@dataclass(frozen=True)
class TextExample:
    text: str
    label: str
    where: str  # "file:line"
    text_pair: str | None = None


@dataclass(frozen=True)
class TaggedSentence:
    words: tuple[str, ...]
    tags: tuple[str, ...]
    where: str  # "file:line" of the first word


# ---------------------------------------------------------------------------------------------------- readers


def read_text_classification(path: str | Path, *, text_column: str = "text", label_column: str = "label",
                             text_pair_column: str | None = None) -> list[TextExample]:
    """Rows of a .csv/.tsv (header line first) or .jsonl (one object per line) file."""
    path = Path(path)
    if not path.is_file():
        raise PptkError(f"data file {path} does not exist; check the path")
    columns = [c for c in (text_column, text_pair_column, label_column) if c]
    if path.suffix in (".csv", ".tsv"):
        rows = _csv_rows(path, columns)
    elif path.suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path, columns)
    else:
        raise PptkError(f"{path}: unknown format {path.suffix!r}; use .csv, .tsv (with a header line) or .jsonl")
    examples = []
    for where, row in rows:
        text = _field(row, text_column, where)
        pair = _field(row, text_pair_column, where) if text_pair_column else None
        label = _field(row, label_column, where)
        examples.append(TextExample(text, label, where, pair))
    if not examples:
        raise PptkError(f"{path} has no examples; fill it or point to another file")
    return examples


def _csv_rows(path: Path, columns: list[str]) -> Iterator[tuple[str, dict]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise PptkError(f"{path}:1: no column {', '.join(map(repr, missing))} in the header {header}; pass "
                            "--text-column / --label-column / --text-pair-column with the names this file uses")
        for row in reader:
            yield f"{path}:{reader.line_num}", row


def _jsonl_rows(path: Path, columns: list[str]) -> Iterator[tuple[str, dict]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PptkError(f"{where}: not a JSON object ({err.msg}); .jsonl wants one object per line") from None
            if not isinstance(row, dict):
                raise PptkError(f"{where}: expected a JSON object, got {type(row).__name__}")
            missing = [c for c in columns if c not in row]
            if missing:
                raise PptkError(f"{where}: no key {', '.join(map(repr, missing))} (keys: {sorted(row)}); pass "
                                "--text-column / --label-column / --text-pair-column with the names this file uses")
            yield where, row


def _field(row: dict, column: str, where: str) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise PptkError(f"{where}: empty {column!r}; every example needs a text and a label")
    return str(value).strip()


def read_conll(path: str | Path) -> list[TaggedSentence]:
    """CoNLL: one ``token tag`` per line (extra columns between them, as in CoNLL-2003, are ignored: the tag is the
    last column), a blank line between sentences, ``-DOCSTART-`` lines skipped. Tags are IOB: O, B-X, I-X."""
    path = Path(path)
    if not path.is_file():
        raise PptkError(f"data file {path} does not exist; check the path")
    sentences, words, tags, start = [], [], [], ""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0] == DOCSTART:
                if words:
                    sentences.append(TaggedSentence(tuple(words), tuple(tags), start))
                words, tags = [], []
                continue
            where = f"{path}:{number}"
            if len(fields) < 2:
                raise PptkError(f"{where}: malformed CoNLL line {line.strip()!r}: expected 'token tag' (whitespace "
                                "separated), or a blank line between sentences")
            if not IOB_TAG.match(fields[-1]):
                raise PptkError(f"{where}: tag {fields[-1]!r} is not an IOB tag (O, B-TYPE, I-TYPE); convert the "
                                "file to IOB tags")
            if not words:
                start = where
            words.append(fields[0])
            tags.append(fields[-1])
    if words:
        sentences.append(TaggedSentence(tuple(words), tuple(tags), start))
    if not sentences:
        raise PptkError(f"{path} has no sentences; fill it or point to another file")
    return sentences


# ---------------------------------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelMap:
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise PptkError(f"the label set {list(self.names)} has duplicates; list each label once")

    def __len__(self) -> int:
        return len(self.names)

    def id(self, label: str, where: str) -> int:
        try:
            return self.names.index(label)
        except ValueError:
            raise PptkError(f"{where}: label {label!r} is not in the label set {list(self.names)}; fix the data, or "
                            "pass the full set with --labels (a fine-tuned checkpoint's labels are fixed by its "
                            "config.json)") from None


def class_label_names(labels: Sequence[str]) -> tuple[str, ...]:
    """Sorted; numerically when every label is an integer ("2" < "10"), so "0", "1", ... keep their ids."""
    unique = set(labels)
    if all(re.fullmatch(r"-?\d+", label) for label in unique):
        return tuple(sorted(unique, key=int))
    return tuple(sorted(unique))


def tag_label_names(tags: Sequence[str]) -> tuple[str, ...]:
    """"O" first, then by entity type, B before I (the conventional CoNLL order)."""
    unique = set(tags) - {"O"}
    return ("O",) + tuple(sorted(unique, key=lambda t: (t[2:], "BIES".index(t[0]))))


def _config_label_names(config) -> tuple[str, ...] | None:
    """The labels a checkpoint's config.json fixes, or None when it holds transformers' defaults (LABEL_0, ...)."""
    id2label = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
    names = tuple(id2label[i] for i in sorted(id2label))
    if not names or names == tuple(f"LABEL_{i}" for i in range(len(names))):
        return None
    return names


def resolve_labels(config, data_names: Sequence[str], *, explicit: Sequence[str] | None = None,
                   num_labels: int | None = None, head_rows: int | None = None) -> LabelMap:
    """One label set from the data, --labels, the checkpoint's id2label and --num-labels, or an error naming both.

    head_rows: the output size of a classifier already in the checkpoint (None when it has none).
    """
    from_config = _config_label_names(config)
    if explicit and from_config and tuple(explicit) != from_config:
        raise PptkError(f"--labels {list(explicit)} disagrees with the checkpoint's config.json id2label "
                        f"{list(from_config)}; drop --labels, or fine-tune from the base model")
    label_map = LabelMap(tuple(explicit) if explicit else from_config or tuple(data_names))
    if num_labels is not None and num_labels != len(label_map):
        source = "--labels" if explicit else "the checkpoint's config.json" if from_config else "the training data"
        raise PptkError(f"--num-labels {num_labels} disagrees with the {len(label_map)} labels of {source}: "
                        f"{list(label_map.names)}; drop --num-labels or fix the data")
    if head_rows is not None and head_rows != len(label_map):
        raise PptkError(f"the checkpoint's classifier has {head_rows} outputs but there are {len(label_map)} labels "
                        f"{list(label_map.names)}; fine-tune from the base model (no classifier), or use data with "
                        f"the checkpoint's {head_rows} labels")
    if len(label_map) < 2:
        raise PptkError(f"only one label ({label_map.names[0]!r}) in the data; classification needs at least two")
    return label_map


def config_with_labels(config, label_map: LabelMap):
    """A copy of the config whose head has one output per label, named as in the data (saved with checkpoints)."""
    config = copy.deepcopy(config)
    config.id2label = dict(enumerate(label_map.names))
    config.label2id = {name: i for i, name in enumerate(label_map.names)}
    config.num_labels = len(label_map)
    return config


# ---------------------------------------------------------------------------------------------------- tokenization


def _check_lengths(lengths: Sequence[int], wheres: Sequence[str], *, max_len: int) -> None:
    over = [(n, where) for n, where in zip(lengths, wheres) if n > max_len]
    if over:
        n, where = over[0]
        more = f" (and {len(over) - 1} more examples)" if len(over) > 1 else ""
        raise PptkError(f"{where}: {n} tokens, longer than --max-seq-len {max_len}{more}; pass --truncate to cut "
                        "examples to --max-seq-len, or raise --max-seq-len (up to the model's positions)")


def encode_classification(examples: Sequence[TextExample], tokenizer, label_map: LabelMap, *, max_len: int,
                          truncate: bool) -> list[dict]:
    """Features {input_ids, token_type_ids, labels: int}; a text pair gets token type 1, as BERT was trained."""
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples] if examples[0].text_pair is not None else None
    encoded = tokenizer(texts, pairs, truncation="longest_first" if truncate else False, max_length=max_len,
                        verbose=False)
    if not truncate:
        _check_lengths([len(ids) for ids in encoded["input_ids"]], [e.where for e in examples], max_len=max_len)
    return [{"input_ids": ids, "token_type_ids": types, "labels": label_map.id(e.label, e.where)}
            for ids, types, e in zip(encoded["input_ids"], encoded["token_type_ids"], examples)]


def encode_tagging(sentences: Sequence[TaggedSentence], tokenizer, label_map: LabelMap, *, max_len: int,
                   truncate: bool) -> list[dict]:
    """Features {input_ids, token_type_ids, labels: list}; a word's label sits on its first sub-token, every other
    position is IGNORE. With truncation, words past max_len are dropped (and so not scored)."""
    tag_ids = [[label_map.id(tag, s.where) for tag in s.tags] for s in sentences]
    encoded = tokenizer([list(s.words) for s in sentences], is_split_into_words=True, truncation=truncate,
                        max_length=max_len, verbose=False)
    if not truncate:
        _check_lengths([len(ids) for ids in encoded["input_ids"]], [s.where for s in sentences], max_len=max_len)
    features = []
    for i, ids in enumerate(encoded["input_ids"]):
        labels, previous = [], None
        for word in encoded.word_ids(i):
            labels.append(IGNORE if word is None or word == previous else tag_ids[i][word])
            previous = word
        features.append({"input_ids": ids, "token_type_ids": encoded["token_type_ids"][i], "labels": labels})
    return features


def read_lines(paths: Sequence[str | Path]) -> list[tuple[str, str]]:
    """(text, "file:line") for every non-empty line of UTF-8 text files: one masked-LM example per line."""
    if not paths:
        raise PptkError("no text files given; pass at least one path")
    lines = []
    for path in map(Path, paths):
        if not path.is_file():
            raise PptkError(f"text file {path} does not exist; check the path")
        with path.open(encoding="utf-8") as f:
            lines += [(line.strip(), f"{path}:{n}") for n, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise PptkError(f"no text in {', '.join(map(str, paths))}; every non-empty line is an example")
    return lines


def encode_lines(lines: Sequence[tuple[str, str]], tokenizer, *, max_len: int, truncate: bool) -> list[dict]:
    """Features {input_ids, token_type_ids, special_tokens_mask} for masked-LM (labels come from the masking)."""
    encoded = tokenizer([text for text, _ in lines], truncation=truncate, max_length=max_len,
                        return_special_tokens_mask=True, verbose=False)
    if not truncate:
        _check_lengths([len(ids) for ids in encoded["input_ids"]], [where for _, where in lines], max_len=max_len)
    keys = ("input_ids", "token_type_ids", "special_tokens_mask")
    return [dict(zip(keys, values)) for values in zip(*(encoded[k] for k in keys))]


# ---------------------------------------------------------------------------------------------------- batches


def pad_batch(features: Sequence[dict], *, pad_id: int) -> Batch:
    """Right-pad to the longest sequence of these features: ((input_ids, attention_mask, token_type_ids), labels).

    Per-token labels are padded with IGNORE; per-sequence labels become a [batch] tensor.
    """
    length = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), length), dtype=torch.long)
    types = torch.zeros((len(features), length), dtype=torch.long)
    per_token = isinstance(features[0]["labels"], list)
    labels = torch.full((len(features), length), IGNORE, dtype=torch.long) if per_token else \
        torch.tensor([f["labels"] for f in features], dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        ids[row, :n] = torch.tensor(f["input_ids"])
        mask[row, :n] = 1
        types[row, :n] = torch.tensor(f["token_type_ids"])
        if per_token:
            labels[row, :n] = torch.tensor(f["labels"])
    return (ids, mask, types), labels


def steps_per_epoch(num_examples: int, *, global_batch_size: int, what: str = "training examples") -> int:
    steps = num_examples // global_batch_size
    if steps == 0:
        raise PptkError(f"{num_examples} {what} are fewer than one step's global batch of {global_batch_size}; "
                        "lower --micro-batch-size or --grad-accum-steps, or give more data")
    return steps


def train_micro_batches(features: Sequence[dict], *, micro_batch_size: int, micro_batches_per_epoch: int,
                        dp_rank: int, dp_size: int, seed: int, collate: Callable[[list[dict]], Batch],
                        start: int = 0) -> Iterator[Batch]:
    """Endless micro-batches for one data-parallel replica, epoch after epoch.

    Epoch e is a permutation seeded by (seed, e); micro-batch i of it on replica r holds slice i * dp_size + r, so
    replicas see disjoint examples and the tail that does not fill a whole step is skipped. Every pipeline stage of a
    replica builds the same iterator, so the first stage's inputs and the last stage's labels belong together.
    ``start`` skips that many of this replica's micro-batches without building them (resuming at a step).
    """
    epoch, first = divmod(start, micro_batches_per_epoch)
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(features))
        for i in range(first, micro_batches_per_epoch):
            begin = (i * dp_size + dp_rank) * micro_batch_size
            yield collate([features[j] for j in order[begin:begin + micro_batch_size]])
        epoch, first = epoch + 1, 0


def eval_micro_batches(features: Sequence[dict], *, micro_batch_size: int, dp_rank: int, dp_size: int,
                       collate: Callable[[list[dict]], Batch]) -> list[Batch]:
    """This replica's share of the whole evaluation set, as micro-batches; every example is used exactly once.

    Sorted by length (less padding) and dealt round-robin to the replicas; every replica gets the same number of
    micro-batches (DeepSpeed's eval_batch needs that), holding micro_batch_size examples or a few more.
    """
    if len(features) < dp_size:
        raise PptkError(f"{len(features)} evaluation examples cannot be shared by {dp_size} data-parallel replicas; "
                        "give more evaluation data")
    by_length = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    mine = by_length[dp_rank::dp_size]
    count = min(-(-len(features) // (micro_batch_size * dp_size)), len(features) // dp_size)
    return [collate([features[i] for i in chunk]) for chunk in np.array_split(np.array(mine), count)]


def recording_lengths(batches: Iterator[Batch], seen: set[int]) -> Iterator[Batch]:
    """Pass micro-batches through, adding each one's padded sequence length to ``seen`` (reported by the recipes)."""
    for batch in batches:
        seen.add(int(batch[0][0].shape[1]))
        yield batch


# ---------------------------------------------------------------------------------------------------- epochs


def epoch_ends(steps_per_epoch: int, *, epochs: int, max_steps: int | None) -> list[int]:
    """The step that ends each epoch; --max-steps (if given) cuts the run short, or stretches it past --epochs."""
    if epochs < 1 and max_steps is None:
        raise PptkError(f"--epochs must be at least 1, got {epochs}")
    total = max_steps if max_steps is not None else epochs * steps_per_epoch
    if total < 1:
        raise PptkError(f"--max-steps must be at least 1, got {total}")
    ends = list(range(steps_per_epoch, total, steps_per_epoch))
    return ends + [total]


@dataclass(frozen=True)
class EpochPlan:
    layout: object  # pptk.parallel.Layout
    ds_config: dict
    steps_per_epoch: int
    ends: list[int]

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.layout.grad_accum_steps


def plan_epochs(args: argparse.Namespace, *, num_examples: int, what: str = "training examples") -> EpochPlan:
    """Layout and DeepSpeed config for an epoch-based run; sets args.max_steps (the LR schedule's length) first.

    Needs only WORLD_SIZE, so it runs (and fails) before any process group exists.
    """
    from pptk.ds_config import load_ds_config
    from pptk.train import default_ds_config, layout_from_args, resolve_ds_config

    layout = layout_from_args(args, load_ds_config(args.ds_config or default_ds_config()))
    per_epoch = steps_per_epoch(num_examples, global_batch_size=layout.global_batch_size, what=what)
    ends = epoch_ends(per_epoch, epochs=args.epochs, max_steps=args.max_steps)
    args.max_steps = ends[-1]
    ds_config, layout = resolve_ds_config(args, layout)
    return EpochPlan(layout, ds_config, per_epoch, ends)


def resolve_bert(args: argparse.Namespace, *, examples: str) -> tuple:
    """(source, tokenizer, max_len) for a BERT recipe: the model, its tokenizer and the length limit, checked."""
    from transformers import AutoTokenizer

    from pptk.pipeline import max_positions, resolve_model

    source = resolve_model(args.model)
    if source.config.model_type != "bert":
        raise PptkError(f"{args.model} is a {source.config.model_type!r} model; this recipe trains BERT")
    positions = max_positions(source.config)
    max_len = args.max_seq_len or positions
    if max_len > positions:
        raise PptkError(f"--max-seq-len {max_len} is longer than the model's {positions} positions; use "
                        f"--max-seq-len {positions} or less (with --truncate for longer {examples})")
    if args.tokenizer is None and source.pretrained_dir is None:
        raise PptkError(f"{args.model} has no weights and no tokenizer; point --model to a Hugging Face BERT "
                        "directory, or pass --tokenizer for a from-scratch config")
    return source, AutoTokenizer.from_pretrained(args.tokenizer or source.pretrained_dir), max_len


def train_by_epoch(engine, train_iter: Iterator, *, args: argparse.Namespace, plan, epochs: EpochPlan,
                   evaluate: Callable[[int, int], None], log, tokens_per_sample: float, start_step: int = 0):
    """pptk.train.train with ``evaluate(step, epoch)`` and a checkpoint at least at every epoch end. A resumed run
    (start_step from --resume-from) continues inside its epoch."""
    from pptk.train import train

    epoch_of = {end: epoch for epoch, end in enumerate(epochs.ends, 1)}
    run_args = argparse.Namespace(**{**vars(args), "max_steps": epochs.ends[-1],
                                     "save_every": min(args.save_every, epochs.steps_per_epoch)})
    return train(engine, train_iter, args=run_args, plan=plan, layout=epochs.layout,
                 tokens_per_sample=tokens_per_sample, eval_batches=None, log=log, start_step=start_step,
                 evaluate_at=epoch_of.__contains__, on_evaluate=lambda step: evaluate(step, epoch_of[step]))


def replica_mean(value: float) -> float:
    """The mean over data-parallel replicas of a value every rank of a replica holds (an eval_batch loss)."""
    import torch.distributed as dist

    total = torch.tensor(float(value), dtype=torch.float64)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def write_summary(args: argparse.Namespace, summary, *, wandb_dir: str | None, evaluations: list[dict],
                  lengths: set[int], **extra) -> None:
    """<output-dir>/summary.json and the closing lines (rank 0): losses, evaluations, padded lengths, outputs."""
    result = {**extra, "first_loss": summary.first_loss, "last_loss": summary.last_loss, "steps": summary.steps,
              "tokens_per_s": round(summary.tokens_per_s, 1), "evaluations": evaluations,
              "train_seq_lens": sorted(lengths), "checkpoints": str(summary.checkpoint_dir),
              "metrics": str(summary.metrics_path), "wandb": wandb_dir}
    (args.output_dir / "summary.json").write_text(json.dumps(result, indent=2))
    print("\n== pptk summary ==")
    print(f"loss {summary.first_loss:.3f} -> {summary.last_loss:.3f} over {summary.steps} steps; padded lengths "
          f"seen: {sorted(lengths)}")
    print(f"checkpoints  {summary.checkpoint_dir}\nmetrics      {summary.metrics_path}\n"
          f"W&B run      {wandb_dir or 'disabled'}", flush=True)


# ---------------------------------------------------------------------------------------------------- metrics


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], names: Sequence[str]) -> tuple[dict, str]:
    """Accuracy, macro F1 and a per-class precision/recall/F1 table (no scikit-learn needed)."""
    rows, f1s = [], []
    for k, name in enumerate(names):
        tp = sum(t == k and p == k for t, p in zip(y_true, y_pred))
        predicted = sum(p == k for p in y_pred)
        support = sum(t == k for t in y_true)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append((name, precision, recall, f1, support))
        f1s.append(f1)
    accuracy = sum(t == p for t, p in zip(y_true, y_pred)) / max(1, len(y_true))
    macro_f1 = sum(f1s) / len(f1s)
    width = max(12, *(len(n) for n in names))
    lines = [f"{'':>{width}}  precision     recall   f1-score    support", ""]
    lines += [f"{n:>{width}}  {p:>9.4f}  {r:>9.4f}  {f:>9.4f}  {s:>9}" for n, p, r, f, s in rows]
    lines += ["", f"{'accuracy':>{width}}  {'':>9}  {'':>9}  {accuracy:>9.4f}  {len(y_true):>9}",
              f"{'macro avg':>{width}}  {sum(r[1] for r in rows) / len(rows):>9.4f}  "
              f"{sum(r[2] for r in rows) / len(rows):>9.4f}  {macro_f1:>9.4f}  {len(y_true):>9}"]
    return {"accuracy": accuracy, "f1_macro": macro_f1}, "\n".join(lines)


def tagging_metrics(y_true: list[list[str]], y_pred: list[list[str]]) -> tuple[dict, str]:
    """Entity-level precision/recall/F1 per entity type and micro/macro/weighted averages (seqeval, conlleval mode:
    an I- tag that follows O starts an entity, as conlleval counts it)."""
    from seqeval.metrics import classification_report

    text = classification_report(y_true, y_pred, digits=4, zero_division=0)
    table = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    metrics = {"precision": table["micro avg"]["precision"], "recall": table["micro avg"]["recall"],
               "f1": table["micro avg"]["f1-score"], "f1_macro": table["macro avg"]["f1-score"],
               "f1_weighted": table["weighted avg"]["f1-score"]}
    return {k: float(v) for k, v in metrics.items()}, text
