# `pptk timeline RUN_DIR`: one logged step as a Gantt chart (PNG) and a Chrome trace (Perfetto, chrome://tracing).
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pptk.errors import PptkError
from pptk.training.observe import TIMELINE_FILE

COLOURS = {"forward": "#4C72B0", "backward": "#DD8452", "comm": "#55A868", "optimizer": "#8172B3", "idle": "#D9D9D9"}
LABELS = {"forward": "forward", "backward": "backward", "comm": "send-recv", "optimizer": "optimizer", "idle": "idle"}


def read_timeline(run_dir: Path) -> dict:
    path = run_dir / TIMELINE_FILE
    if not path.is_file():
        raise PptkError(
            f"{run_dir} has no {TIMELINE_FILE}: point to a run's --output-dir (it is written at every --log-every step)"
        )
    return json.loads(path.read_text())


def segments(stage: dict) -> list[tuple[str, float, float, str]]:
    """(kind, start, end, label) covering the whole step: the wait inside a communication instruction and the gaps
    between instructions are "idle", so the idle drawn is the bubble logged (pptk.training.observe)."""
    out, cursor = [], 0.0
    for i in sorted(stage["intervals"], key=lambda i: i["start"]):
        if i["start"] > cursor:
            out.append(("idle", cursor, i["start"], "idle"))
        work_start = i["start"] + i["wait"]
        if i["wait"] > 0:
            out.append(("idle", i["start"], work_start, f"wait in {i['name']}"))
        label = i["name"] + (f" phase {i['phase']}" if i["phase"] else "")
        out.append((i["kind"], work_start, i["end"], label))
        cursor = max(cursor, i["end"])
    if stage["step_s"] > cursor:
        out.append(("idle", cursor, stage["step_s"], "idle"))
    return out


def chrome_trace(timeline: dict) -> dict:
    events = []
    for stage in timeline["stages"]:
        pid = stage["stage"]
        events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"stage {pid}"}})
        for kind, start, end, label in segments(stage):
            events.append(
                {
                    "name": label,
                    "cat": kind,
                    "ph": "X",
                    "pid": pid,
                    "tid": 0,
                    "ts": start * 1e6,
                    "dur": (end - start) * 1e6,
                }
            )
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"step": timeline["step"]}}


def draw(timeline: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    stages = timeline["stages"]
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.7 * len(stages)))
    for row, stage in enumerate(stages):
        for kind, start, end, _ in segments(stage):
            ax.broken_barh([(start * 1000, (end - start) * 1000)], (row - 0.4, 0.8), color=COLOURS[kind], linewidth=0)
    ax.set_yticks(range(len(stages)), [f"stage {s['stage']}" for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the step began")
    metrics = timeline["metrics"]
    ax.set_title(
        f"step {timeline['step']}, {timeline['schedule']}, {timeline['micro_batches']} micro-batches: "
        f"{metrics['pipe/step_ms']:.0f} ms, measured bubble {metrics['pipe/bubble']:.1%}, "
        f"imbalance {metrics['pipe/imbalance']:.2f}"
    )
    fig.legend(
        handles=[Patch(color=COLOURS[k], label=LABELS[k]) for k in COLOURS],
        loc="lower center",
        ncol=len(COLOURS),
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(png, dpi=120)
    plt.close(fig)


def cmd_timeline(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    timeline = read_timeline(run_dir)
    png = Path(args.png) if args.png else run_dir / "timeline.png"
    trace = Path(args.trace) if args.trace else run_dir / "timeline.trace.json"
    draw(timeline, png)
    trace.write_text(json.dumps(chrome_trace(timeline)))
    print(f"step {timeline['step']}: wrote {png} and {trace} (open the trace in Perfetto or chrome://tracing)")
    for stage in timeline["stages"]:
        parts = ", ".join(
            f"{p} {1000 * stage[f'{p}_s']:.0f}"
            for p in ("forward", "backward", "comm", "comm_wait", "optimizer", "idle")
        )
        print(f"  stage {stage['stage']}: {parts} ms; bubble {stage['bubble']:.1%}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("timeline", help="Gantt chart and Chrome trace of a run's last logged step")
    p.add_argument("run_dir", help="a run's --output-dir")
    p.add_argument("--png", default=None, help="default RUN_DIR/timeline.png")
    p.add_argument("--trace", default=None, help="default RUN_DIR/timeline.trace.json")
    p.set_defaults(func=cmd_timeline)
