# What a run reports: metrics.jsonl, Weights & Biases, the progress bar, and the closing summary (global rank 0).
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pptk.logs import get_logger

log = get_logger(__name__)


def wandb_mode(requested: str | None) -> str:
    """online when a W&B key is configured (WANDB_API_KEY or `wandb login`), else offline; WANDB_MODE wins."""
    if requested:
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


class MetricsLog:
    """metrics.jsonl (one JSON object per record), W&B and a progress bar; a no-op on every rank but rank 0."""

    def __init__(
        self,
        *,
        output_dir: Path,
        active: bool,
        run_config: dict,
        total_steps: int,
        start_step: int,
        wandb_project: str,
        requested_wandb_mode: str | None,
    ):
        self.active = active
        self.path = output_dir / "metrics.jsonl"
        self.run = None
        self.bar = None
        if not active:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        mode = wandb_mode(requested_wandb_mode)
        if mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=wandb_project,
                dir=str(output_dir),
                mode=mode,  # type: ignore[arg-type]  # one of wandb's modes: see wandb_mode
                config=run_config,
                settings=wandb.Settings(silent=True),
            )
        self.total_steps = total_steps
        if sys.stderr.isatty():  # a live bar in a terminal; in a log file, one plain line per logged step instead
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, mininterval=2.0)

    def log(self, record: dict) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.bar is None and "loss" in record:
            log.info(
                f"step {record['step']}/{self.total_steps}: loss {record['loss']:.4f}, lr {record.get('lr', 0):.3g}, "
                f"{record.get('tokens_per_s', 0):,.0f} tokens/s"
            )
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def advance(self, **postfix: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> str | None:
        """Close the bar and the W&B run; returns the W&B run folder (None when W&B is off)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.run is not None:
            run_dir = str(Path(self.run.dir).parent)  # the run folder, not its files/ subfolder
            self.run.finish()
            self.run = None
            return run_dir
        return None


@dataclass
class Summary:
    """The closing record of a run: written to <output-dir>/summary.json and printed by rank 0."""

    task: str
    first_loss: float = float("nan")
    last_loss: float = float("nan")
    steps: int = 0
    tokens_per_s: float = 0.0
    evaluations: list[dict] = field(default_factory=list)
    checkpoints: str | None = None
    metrics: str | None = None
    wandb: str | None = None
    export_hf: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # task-specific: labels, padded lengths, a text sample

    @property
    def eval_loss(self) -> float | None:
        return self.evaluations[-1].get("eval_loss") if self.evaluations else None

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "steps": self.steps,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "eval_loss": self.eval_loss,
            "evaluations": self.evaluations,
            "checkpoints": self.checkpoints,
            "metrics": self.metrics,
            "wandb": self.wandb,
            "export_hf": self.export_hf,
            **self.extra,
        }

    def write(self, output_dir: Path) -> None:
        (output_dir / "summary.json").write_text(json.dumps(self.to_dict(), indent=2))
        lines = [
            "",
            "== pptk summary ==",
            f"loss {self.first_loss:.3f} -> {self.last_loss:.3f} over {self.steps} steps"
            + (f", eval loss {self.eval_loss:.3f}" if self.eval_loss is not None else ""),
            f"throughput   {self.tokens_per_s:,.0f} tokens/s",
            f"checkpoints  {self.checkpoints}",
            f"metrics      {self.metrics}",
            f"W&B run      {self.wandb or 'disabled'}",
        ]
        if self.export_hf:
            lines.append(f"HF export    {self.export_hf}  (AutoModelFor*.from_pretrained loads it)")
        for key, value in self.extra.items():
            if isinstance(value, str) and "\n" in value:
                lines += [f"{key}:", *(f"  {line}" for line in value.splitlines())]
            elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
                # e.g. SFT's samples: one line per item, "prompt: ... | answer: ..."
                lines += [f"{key}:"] + [
                    "  " + " | ".join(f"{k}: {v!s}".replace("\n", " ") for k, v in item.items()) for item in value
                ]
            elif not isinstance(value, (list, dict)):
                lines.append(f"{key:<12} {value}")
        log.info("\n".join(lines))


def format_evaluation(record: dict, report: str | None) -> str:
    """One line for the log (and the report below it, if the task has one)."""
    where = f"step {record['step']}" + (f", epoch {record['epoch']}" if "epoch" in record else "")
    shown = ", ".join(
        f"{k.removeprefix('eval_')} {v:.4f}"
        for k, v in record.items()
        if k.startswith("eval_") and isinstance(v, float)
    )
    return f"== evaluation at {where}: {shown}" + (f"\n{report}" if report else "")
