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


def test_the_lora_memory_result_measures_both_precisions_at_pp2_and_lora_holds_less():
    result = json.loads((ROOT / "benchmarks" / "results" / "lora_memory.json").read_text())
    rows = result["rows"]
    assert sorted((row["precision"], row["stage"]) for row in rows) == [
        ("bf16", 0),
        ("bf16", 1),
        ("fp32", 0),
        ("fp32", 1),
    ]
    for row in rows:
        assert row["lora_measured_bytes"] < row["full_measured_bytes"], row
        assert row["lora_trained_params"] < 0.05 * row["full_trained_params"], row
        assert row["lora_over_full_measured"] == row["lora_measured_bytes"] / row["full_measured_bytes"]
    for precision in ("fp32", "bf16"):
        assert result["lora_over_full_measured"][precision] < 1
        assert 0 < result["lora_over_full_forecast"][precision] < 1
