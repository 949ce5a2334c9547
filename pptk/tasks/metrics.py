# Evaluation metrics: accuracy and per-class F1 of classifiers, entity-level F1 for tagging, a reward model's pairs.
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
    lines += [
        "",
        f"{'accuracy':>{width}}  {'':>9}  {'':>9}  {accuracy:>9.4f}  {len(y_true):>9}",
        f"{'macro avg':>{width}}  {sum(r[1] for r in rows) / len(rows):>9.4f}  "
        f"{sum(r[2] for r in rows) / len(rows):>9.4f}  {macro_f1:>9.4f}  {len(y_true):>9}",
    ]
    return {"accuracy": accuracy, "f1_macro": macro_f1}, "\n".join(lines)


def tagging_metrics(y_true: list[list[str]], y_pred: list[list[str]]) -> tuple[dict, str]:
    """Entity-level precision/recall/F1 per entity type and micro/macro/weighted averages (seqeval, conlleval mode:
    an I- tag that follows O starts an entity, as conlleval counts it)."""
    from seqeval.metrics import classification_report

    text = classification_report(y_true, y_pred, digits=4, zero_division=0)
    table = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    metrics = {
        "precision": table["micro avg"]["precision"],
        "recall": table["micro avg"]["recall"],
        "f1": table["micro avg"]["f1-score"],
        "f1_macro": table["macro avg"]["f1-score"],
        "f1_weighted": table["weighted avg"]["f1-score"],
    }
    return {k: float(v) for k, v in metrics.items()}, text


def pair_metrics(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """TRL's reward accuracy (chosen scored strictly higher) and the mean margin and rewards."""
    c, r = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    return {
        "accuracy": float((c > r).mean()),
        "margin": float((c - r).mean()),
        "chosen_reward": float(c.mean()),
        "rejected_reward": float(r.mean()),
    }
