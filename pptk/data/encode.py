# Tokenization of fine-tuning examples (lengths checked, truncation explicit) and right-padded micro-batches.
from __future__ import annotations

from collections.abc import Sequence

import torch

from pptk.data.labels import LabelMap
from pptk.data.readers import TaggedSentence, TextExample
from pptk.errors import PptkError

IGNORE = -100  # the label Hugging Face's losses skip: padding, special tokens, non-first sub-tokens

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]  # ((ids, mask, types), labels)


def _check_lengths(lengths: Sequence[int], wheres: Sequence[str], *, max_len: int) -> None:
    over = [(n, where) for n, where in zip(lengths, wheres) if n > max_len]
    if over:
        n, where = over[0]
        more = f" (and {len(over) - 1} more examples)" if len(over) > 1 else ""
        raise PptkError(
            f"{where}: {n} tokens, longer than --max-seq-len {max_len}{more}; pass --truncate to cut "
            "examples to --max-seq-len, or raise --max-seq-len (up to the model's positions)"
        )


def encode_classification(
    examples: Sequence[TextExample], tokenizer, label_map: LabelMap, *, max_len: int, truncate: bool
) -> list[dict]:
    """Features {input_ids, token_type_ids, labels: int}; a text pair gets token type 1, as BERT was trained."""
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples] if examples[0].text_pair is not None else None
    encoded = tokenizer(
        texts, pairs, truncation="longest_first" if truncate else False, max_length=max_len, verbose=False
    )
    if not truncate:
        _check_lengths([len(ids) for ids in encoded["input_ids"]], [e.where for e in examples], max_len=max_len)
    return [
        {"input_ids": ids, "token_type_ids": types, "labels": label_map.id(e.label, e.where)}
        for ids, types, e in zip(encoded["input_ids"], encoded["token_type_ids"], examples)
    ]


def encode_tagging(
    sentences: Sequence[TaggedSentence], tokenizer, label_map: LabelMap, *, max_len: int, truncate: bool
) -> list[dict]:
    """Features {input_ids, token_type_ids, labels: list}; a word's label sits on its first sub-token, every other
    position is IGNORE. With truncation, words past max_len are dropped (and so not scored)."""
    tag_ids = [[label_map.id(tag, s.where) for tag in s.tags] for s in sentences]
    encoded = tokenizer(
        [list(s.words) for s in sentences],
        is_split_into_words=True,
        truncation=truncate,
        max_length=max_len,
        verbose=False,
    )
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


def encode_lines(lines: Sequence[tuple[str, str]], tokenizer, *, max_len: int, truncate: bool) -> list[dict]:
    """Features {input_ids, token_type_ids, special_tokens_mask} for masked-LM (labels come from the masking)."""
    encoded = tokenizer(
        [text for text, _ in lines],
        truncation=truncate,
        max_length=max_len,
        return_special_tokens_mask=True,
        verbose=False,
    )
    if not truncate:
        _check_lengths([len(ids) for ids in encoded["input_ids"]], [where for _, where in lines], max_len=max_len)
    keys = ("input_ids", "token_type_ids", "special_tokens_mask")
    return [dict(zip(keys, values)) for values in zip(*(encoded[k] for k in keys))]


# ---------------------------------------------------------------------------------------------------- batches


def pad_batch(features: Sequence[dict], *, pad_id: int, length: int | None = None) -> Batch:
    """Right-pad to the longest sequence of these features, or to ``length`` (fixed-shape schedules):
    ((input_ids, attention_mask, token_type_ids), labels).

    Per-token labels are padded with IGNORE; per-sequence labels become a [batch] tensor.
    """
    length = length or max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), length), dtype=torch.long)
    types = torch.zeros((len(features), length), dtype=torch.long)
    per_token = isinstance(features[0]["labels"], list)
    labels = (
        torch.full((len(features), length), IGNORE, dtype=torch.long)
        if per_token
        else torch.tensor([f["labels"] for f in features], dtype=torch.long)
    )
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        ids[row, :n] = torch.tensor(f["input_ids"])
        mask[row, :n] = 1
        types[row, :n] = torch.tensor(f["token_type_ids"])
        if per_token:
            labels[row, :n] = torch.tensor(f["labels"])
    return (ids, mask, types), labels


def longest(*feature_lists: Sequence[dict]) -> int:
    """The longest encoded example: the one length every micro-batch is padded to when shapes must not change."""
    return max(len(f["input_ids"]) for features in feature_lists for f in features)


def fill_rows(batch: Batch, *, rows: int) -> Batch:
    """``batch`` grown to ``rows`` examples by copies of its first one, labelled IGNORE throughout: the loss skips
    them and the metrics drop them (``is_filler``), so a short evaluation micro-batch takes the shape every other
    one has (DualPipeV sends activation shapes once) and scores exactly as it would unfilled. Copies of a real
    example rather than padding, so no filler row attends to nothing."""
    inputs, labels = batch
    missing = rows - len(labels)
    if missing <= 0:
        return batch
    filled = tuple(torch.cat([t, t[:1].expand(missing, *t.shape[1:])]) for t in inputs)
    filler = torch.full((missing, *labels.shape[1:]), IGNORE, dtype=labels.dtype)
    return filled, torch.cat([labels, filler])


def is_filler(labels: torch.Tensor) -> torch.Tensor:
    """Per row of a classification micro-batch's labels: True for the rows ``fill_rows`` added (nothing in them is
    scored). A real example always has a label: its class, or its first word's tag."""
    return (labels == IGNORE).reshape(len(labels), -1).all(dim=1)
