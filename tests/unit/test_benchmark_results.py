# Committed benchmark results name no machine's directories: paths are stored relative to the repository.
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_file import repo_relative  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


def _strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "results").glob("*.json")), ids=lambda p: p.name)
def test_committed_results_hold_no_absolute_paths(path):
    absolute = [s for s in _strings(json.loads(path.read_text())) if s.startswith("/")]
    assert not absolute, f"{path.name} names absolute paths {absolute[:3]}; write it with results_file.write_result"


def test_paths_inside_the_repository_become_relative_and_others_stay():
    result = repo_relative(
        {
            "out": ROOT / "benchmarks" / "results" / "x.json",
            "runs": [str(ROOT / "runs" / "a")],
            "elsewhere": "/tmp/data",
            "n": 3,
        }
    )
    assert result == {"out": "benchmarks/results/x.json", "runs": ["runs/a"], "elsewhere": "/tmp/data", "n": 3}
