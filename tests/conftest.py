# Shared test set-up: CPU DeepSpeed, one thread per rank, no hub access, W&B offline.
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def padded_batch():
    """A right-padded batch: row lengths 16, 11, 6 (the first row is full)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (3, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    mask[2, 6:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def pytest_collection_finish(session):
    """With multi-rank tests collected, start building DeepSpeed's CPU FusedAdam (the shipped bf16 config's
    optimizer, ~45 s on 2 cores) in the background: `make test` runs the single-process unit tier first, so the
    build overlaps it. tests/distributed/conftest.py waits for it before the first launch."""
    if os.environ.get("DS_ACCELERATOR") == "cpu" and any("tests/distributed/" in item.nodeid for item in session.items):
        code = "from pptk.deepspeed_compat import build_op; build_op('FusedAdamBuilder')"
        build = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        session.config.pptk_fused_adam_build = build  # type: ignore[attr-defined]


# Session-wide launches several modules read (tests/distributed/conftest.py). `make test` runs pytest-xdist with
# --dist loadgroup: a module's tests stay on one worker (its module-scoped launches start once), and modules that
# read the same session launch share a worker too, so no launch runs twice.
SHARED_LAUNCHES = ("demo_run", "verified_pp2", "verified_pp3")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("xdist"):
        return
    parent: dict[str, str] = {}  # union-find over module paths and shared launches

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    for item in items:
        module = item.nodeid.split("::")[0]
        for launch in SHARED_LAUNCHES:
            if launch in item.fixturenames:
                parent[root(launch)] = root(module)
    for item in items:
        item.add_marker(pytest.mark.xdist_group(root(item.nodeid.split("::")[0])))
