# Shared test set-up: CPU DeepSpeed, one thread per rank, no hub access, W&B offline.
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
