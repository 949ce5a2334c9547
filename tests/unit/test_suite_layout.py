# `make test` must run the multi-rank tier: pytest silently skips directories matching `norecursedirs`, which by
# default names build outputs (dist, build, ...); the tier was once called tests/dist and never ran.
import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_plain_pytest_collects_the_distributed_tier(pytestconfig):
    skipped = pytestconfig.getini("norecursedirs")
    for directory in ("tests", "tests/distributed", "tests/unit"):
        name = Path(directory).name
        assert not any(fnmatch.fnmatch(name, pattern) for pattern in skipped), (directory, skipped)
        assert len(list((ROOT / directory).rglob("test_*.py"))) >= 10, directory
    assert pytestconfig.getini("testpaths") == ["tests"]
