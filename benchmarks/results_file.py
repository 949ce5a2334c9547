"""Writing a benchmark's JSON: paths inside the repository are stored relative to it, so results committed from
one machine say nothing about another machine's directories (and compare across clones)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def repo_relative(value: Any) -> Any:
    """``value`` with every path (a Path, or a string naming an absolute path) under the repository made relative."""
    if isinstance(value, dict):
        return {key: repo_relative(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [repo_relative(item) for item in value]
    if isinstance(value, Path) or (isinstance(value, str) and value.startswith("/")):
        path = Path(value).resolve()
        return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(value)
    return value


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(repo_relative(result), indent=2) + "\n")
    print(f"wrote {repo_relative(path)}")
