# DPO's reference log-probabilities without a second model: one forward pass through the training pipeline, cached.
"""The reference model of DPO is the policy's start. Its summed answer log-probabilities never change, so pptk
computes them once, before the first step, through the same pipeline (``engine.eval_batch`` with the loss function
switched to return per-pair log-probabilities, ``pptk.tasks.dpo_loss``), and keeps them:

- without LoRA, with the start weights (TRL's ``precompute_ref_log_probs``);
- with LoRA, with every peft adapter layer of the stage disabled (peft's ``enable_adapters(False)``, what
  ``disable_adapter()`` does): the frozen base model, also after a resume.

They are stored in ``<cache>/reference_logps.npy`` (float64 [pairs, 2]: chosen, rejected; the training pairs then
the held-out ones) beside ``fingerprint.json``, and read memory-mapped. The fingerprint covers the tokenized pairs,
the model (config.json and samples of every weight file), seq_len and the precision; a cache whose fingerprint
differs is an error before any rank starts (delete it, or point --reference-cache elsewhere), never silently reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pptk.data.pairs import EncodedPair
from pptk.errors import PptkError

VALUES = "reference_logps.npy"
FINGERPRINT = "fingerprint.json"
_SAMPLE_BYTES = 1 << 20  # per sample of a large weight file
_SAMPLES = 16
_WHOLE_FILE_BYTES = 64 << 20  # smaller weight files are hashed whole


def data_fingerprint(pairs: Sequence[EncodedPair]) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        for values in (pair.chosen_ids, pair.chosen_answer_mask, pair.rejected_ids, pair.rejected_answer_mask):
            digest.update(np.asarray(values, dtype=np.int64).tobytes())
            digest.update(b"|")
    return digest.hexdigest()


def model_fingerprint(model_dir: Path | None, *, config: Any, seed: int) -> str:
    """config.json and every weight file (whole when small, else its size and 16 spread 1 MiB samples): telling two
    fine-tunes of one architecture apart without reading gigabytes."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    if model_dir is None:
        digest.update(f"random init, seed {seed}".encode())
        return digest.hexdigest()
    for path in sorted(model_dir.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            if size <= _WHOLE_FILE_BYTES:
                digest.update(f.read())
                continue
            for k in range(_SAMPLES):
                f.seek((size - _SAMPLE_BYTES) * k // (_SAMPLES - 1))
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


@dataclass(frozen=True)
class ReferenceCache:
    directory: Path
    fingerprint: dict[str, Any]  # data, model, seq_len, precision, pairs

    @property
    def values_path(self) -> Path:
        return self.directory / VALUES

    def load(self, *, replace_stale: bool = False) -> np.ndarray | None:
        """The stored values (memory-mapped) when the cache is complete and its fingerprint matches; None when there
        is none (or, with ``replace_stale``, one for other inputs); else an error naming what differs."""
        stored_path = self.directory / FINGERPRINT
        if not stored_path.is_file() or not self.values_path.is_file():
            return None
        try:
            stored = json.loads(stored_path.read_text())
        except (json.JSONDecodeError, OSError) as err:
            raise PptkError(f"reference cache {stored_path} is unreadable ({err}); delete {self.directory}") from None
        differ = [key for key in self.fingerprint if stored.get(key) != self.fingerprint[key]]
        if differ and replace_stale:
            return None
        if differ:
            what = ", ".join(f"{key} ({stored.get(key)!r} there, {self.fingerprint[key]!r} here)" for key in differ)
            raise PptkError(
                f"the DPO reference cache {self.directory} was computed for other inputs: {what}; delete it to "
                "recompute the reference log-probabilities, or give another --reference-cache directory"
            )
        values = np.load(self.values_path, mmap_mode="r")
        if values.shape != (self.fingerprint["pairs"], 2):
            raise PptkError(
                f"reference cache {self.values_path} holds {values.shape}, expected ({self.fingerprint['pairs']}, 2); "
                f"delete {self.directory} to recompute it"
            )
        return values

    def save(self, values: np.ndarray, *, path_used: str) -> None:
        """Values first, the fingerprint last: a cache without a fingerprint is incomplete and recomputed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / FINGERPRINT).unlink(missing_ok=True)
        partial = self.directory / (VALUES + ".partial.npy")
        np.save(partial, np.asarray(values, dtype=np.float64))
        partial.replace(self.values_path)
        record = {**self.fingerprint, "computed_with": path_used}
        (self.directory / FINGERPRINT).write_text(json.dumps(record, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------ the passes


def collect_pair_logps(
    engine: Any,
    loss_fn: Any,
    make_batch: Any,
    count: int,
    *,
    first: int = 0,
    dp_rank: int,
    dp_size: int,
    pairs_per_micro_batch: int,
) -> np.ndarray:
    """float64 [count, 2]: the summed chosen / rejected answer log-probabilities of pairs first .. first + count - 1
    under the engine's current weights, a collective over every rank. Replicas take pairs round-robin; every replica
    runs the same number of ``engine.eval_batch`` calls of ``engine.micro_batches`` micro-batches (DualPipeV's
    minimum), filled with pairs of index -1 that count nowhere. ``make_batch(indices)``: those pairs' micro-batch."""
    import torch.distributed as dist

    per_call = engine.micro_batches
    per_replica = -(-count // dp_size)
    calls = max(1, -(-per_replica // (pairs_per_micro_batch * per_call)))
    mine = list(range(first + dp_rank, first + count, dp_size))
    mine += [-1] * (calls * per_call * pairs_per_micro_batch - len(mine))
    sums = torch.zeros(count, 2, dtype=torch.float64)
    seen = torch.zeros(count, dtype=torch.float64)
    loss_fn.collect_logps, loss_fn.collected = True, []
    try:
        for call in range(calls):
            start = call * per_call * pairs_per_micro_batch
            chunk = mine[start : start + per_call * pairs_per_micro_batch]
            batches = [
                make_batch(chunk[k : k + pairs_per_micro_batch]) for k in range(0, len(chunk), pairs_per_micro_batch)
            ]
            engine.eval_batch(iter(batches), num_micro_batches=len(batches))
            for output in loss_fn.collected:  # filled on the loss stage only
                rows = output.cpu()
                real = rows[:, 0] >= 0
                index = rows[real, 0].long() - first
                sums[index] += rows[real, 1:]
                seen[index] += 1
            loss_fn.collected = []
    finally:
        loss_fn.collect_logps, loss_fn.collected = False, []
    dist.all_reduce(sums)  # tp ranks of the loss stage each computed the same rows: divide by how many did
    dist.all_reduce(seen)
    if bool((seen == 0).any()):
        missing = int((seen == 0).nonzero()[0, 0])
        raise PptkError(f"the log-probability pass returned nothing for pair {missing}; this is a bug in pptk")
    return (sums / seen[:, None]).numpy()


def adapter_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """peft's adapter layers (LoRA) and trained-in-full wrappers (modules_to_save) in a stage."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:
        return []
    return [m for m in module.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


def uses_adapters(module: torch.nn.Module) -> bool:
    """Whether any stage holds peft adapter layers (a collective: a stage may hold none of them)."""
    import torch.distributed as dist

    found = torch.tensor([1.0 if adapter_layers(module) else 0.0])
    dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return bool(found.item())


@contextmanager
def adapters_disabled(module: torch.nn.Module) -> Iterator[None]:
    """The base model: every adapter layer of the stage off, as peft's ``disable_adapter()``; which parameters train
    is restored exactly afterwards (peft's toggles also set requires_grad)."""
    layers = adapter_layers(module)
    trainable = {name: p.requires_grad for name, p in module.named_parameters()}
    for layer in layers:
        layer.enable_adapters(False)  # type: ignore[operator]
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)  # type: ignore[operator]
        for name, p in module.named_parameters():
            p.requires_grad_(trainable[name])
