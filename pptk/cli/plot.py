# `pptk plot RUN_DIR`: loss, eval loss, learning rate and throughput curves from metrics.jsonl, as one PNG.
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pptk.errors import PptkError

PANELS = (
    ("loss", ("loss", "eval_loss"), "loss"),
    ("learning rate", ("lr",), "lr"),
    ("throughput", ("tokens_per_s",), "tokens/s"),
    ("pipeline", ("pipe/bubble",), "measured bubble"),
)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PptkError(f"{run_dir} has no metrics.jsonl: point to a run's --output-dir")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise PptkError(f"{path} is empty: the run logged nothing yet (it logs every --log-every steps)")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r and "step" in r]
    return [s for s, _ in points], [v for _, v in points]


def draw(records: list[dict], png: Path, *, title: str) -> list[str]:
    """Returns the keys that were drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    drawn = []
    for ax, (name, keys, ylabel) in zip(axes, PANELS):
        for key in keys:
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, marker="o" if key.startswith("eval") else None, markersize=3, label=key)
                drawn.append(key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if len(keys) > 1:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return drawn


def cmd_plot(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    png = Path(args.png) if args.png else run_dir / "curves.png"
    drawn = draw(read_metrics(run_dir), png, title=str(run_dir))
    print(f"wrote {png} ({', '.join(drawn)})")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="loss, eval loss, lr and throughput curves of a run")
    p.add_argument("run_dir", help="a run's --output-dir")
    p.add_argument("--png", default=None, help="default RUN_DIR/curves.png")
    p.set_defaults(func=cmd_plot)
