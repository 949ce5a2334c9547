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


# `make test` runs pytest-xdist on 2 workers. Each module runs on one worker (its module-scoped launches start once),
# and the modules that read a session-wide launch (tests/distributed/conftest.py) share a worker, so no launch runs
# twice. The grouping is ours (pytest_xdist_make_scheduler): xdist 3.8's --dist loadgroup marks nodes through an
# attribute pytest 9 no longer reads, and silently spread every module over both workers.
SHARED_LAUNCHES = ("demo_run", "verified_pp2", "verified_pp3")
SHARED_LAUNCH_MODULES = frozenset(
    f"tests/distributed/{name}.py"
    for name in (
        "test_bert_verify",
        "test_bf16_verify",
        "test_checkpoints",
        "test_decoder_dist",
        "test_gpt2_dist",
        "test_lora_verify",
        "test_multinode",
        "test_pipeline_schedules",
    )
)


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", maxsplit=1)[0]
            return "shared-launches" if module in SHARED_LAUNCH_MODULES else module

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """A module that reads a session-wide launch must be listed, or both workers would start that launch."""
    unlisted = sorted(
        {
            item.nodeid.split("::")[0]
            for item in items
            if set(SHARED_LAUNCHES) & set(item.fixturenames) and item.nodeid.split("::")[0] not in SHARED_LAUNCH_MODULES
        }
    )
    if unlisted:
        raise pytest.UsageError(f"add {unlisted} to SHARED_LAUNCH_MODULES in tests/conftest.py")
