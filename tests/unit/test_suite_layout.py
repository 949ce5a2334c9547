# `make test` must run the multi-rank tier: pytest silently skips directories named like build outputs (dist, build).
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_plain_pytest_collects_the_distributed_tier():
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    collected = [line for line in out.stdout.splitlines() if "::" in line]
    distributed = [line for line in collected if line.startswith("tests/distributed/")]
    assert len(distributed) >= 20, out.stdout[-2000:]
    assert any(line.startswith("tests/unit/") for line in collected)
