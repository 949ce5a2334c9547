# Label sets of classification tasks: from the data, --labels or a fine-tuned checkpoint, checked for agreement.
from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pptk.errors import PptkError


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
            raise PptkError(
                f"{where}: label {label!r} is not in the label set {list(self.names)}; fix the data, or "
                "pass the full set with --labels (a fine-tuned checkpoint's labels are fixed by its "
                "config.json)"
            ) from None


def class_label_names(labels: Sequence[str]) -> tuple[str, ...]:
    """Sorted; numerically when every label is an integer ("2" < "10"), so "0", "1", ... keep their ids."""
    unique = set(labels)
    if all(re.fullmatch(r"-?\d+", label) for label in unique):
        return tuple(sorted(unique, key=int))
    return tuple(sorted(unique))


def tag_label_names(tags: Sequence[str]) -> tuple[str, ...]:
    """ "O" first, then by entity type, B before I (the conventional CoNLL order)."""
    unique = set(tags) - {"O"}
    return ("O", *tuple(sorted(unique, key=lambda t: (t[2:], "BIES".index(t[0])))))


def _config_label_names(config) -> tuple[str, ...] | None:
    """The labels a checkpoint's config.json fixes, or None when it holds transformers' defaults (LABEL_0, ...)."""
    id2label = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
    names = tuple(id2label[i] for i in sorted(id2label))
    if not names or names == tuple(f"LABEL_{i}" for i in range(len(names))):
        return None
    return names


def resolve_labels(
    config,
    data_names: Sequence[str],
    *,
    explicit: Sequence[str] | None = None,
    num_labels: int | None = None,
    head_rows: int | None = None,
) -> LabelMap:
    """One label set from the data, --labels, the checkpoint's id2label and --num-labels, or an error naming both.

    head_rows: the output size of a classifier already in the checkpoint (None when it has none).
    """
    from_config = _config_label_names(config)
    if explicit and from_config and tuple(explicit) != from_config:
        raise PptkError(
            f"--labels {list(explicit)} disagrees with the checkpoint's config.json id2label "
            f"{list(from_config)}; drop --labels, or fine-tune from the base model"
        )
    label_map = LabelMap(tuple(explicit) if explicit else from_config or tuple(data_names))
    if num_labels is not None and num_labels != len(label_map):
        source = "--labels" if explicit else "the checkpoint's config.json" if from_config else "the training data"
        raise PptkError(
            f"--num-labels {num_labels} disagrees with the {len(label_map)} labels of {source}: "
            f"{list(label_map.names)}; drop --num-labels or fix the data"
        )
    if head_rows is not None and head_rows != len(label_map):
        raise PptkError(
            f"the checkpoint's classifier has {head_rows} outputs but there are {len(label_map)} labels "
            f"{list(label_map.names)}; fine-tune from the base model (no classifier), or use data with "
            f"the checkpoint's {head_rows} labels"
        )
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
