# Hugging Face weights into pipeline stages: each rank reads only its own tensors from (sharded) safetensors.
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pptk.errors import PptkError
from pptk.models import PipeLayer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class HFCheckpoint:
    """A local Hugging Face checkpoint opened lazily: a tensor is read only when asked for, shard by shard."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise PptkError(f"{index} is not a valid safetensors index ({err}); re-save the model") from None
            self._shard_of = dict(weight_map)
        elif single.is_file():
            self._shard_of = {name: SINGLE_FILE for name in self._keys_of(single)}
        else:
            found = sorted(p.name for p in self.directory.glob("*")) if self.directory.is_dir() else []
            hint = ("it has PyTorch .bin weights: re-save with `model.save_pretrained(dir)` (safetensors is the "
                    "default)") if any(n.endswith(".bin") for n in found) else "point to a Hugging Face model directory"
            raise PptkError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.directory} (found: {found[:8]}); {hint}")
        self._open: dict[str, object] = {}

    @staticmethod
    def _keys_of(path: Path) -> list[str]:
        try:
            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        except Exception as err:  # safetensors raises its own error types for truncated or corrupt headers
            raise PptkError(f"cannot read {path}: {err}; the file is corrupt or truncated, re-download or re-save it") from None

    def keys(self) -> list[str]:
        return list(self._shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def get(self, name: str) -> torch.Tensor:
        shard = self._shard_of[name]
        if shard not in self._open:
            path = self.directory / shard
            if not path.is_file():
                raise PptkError(f"{INDEX_FILE} lists shard {shard} but {path} is missing; re-download the model")
            try:
                self._open[shard] = safe_open(path, framework="pt")
            except Exception as err:
                raise PptkError(f"cannot open shard {path}: {err}; the file is corrupt or truncated") from None
        try:
            return self._open[shard].get_tensor(name)
        except Exception as err:
            raise PptkError(f"cannot read tensor {name} from {shard}: {err}; the shard is corrupt") from None


def hf_names(module: nn.Module, layers: list[PipeLayer]) -> dict[str, str]:
    """Pipeline state-dict key -> Hugging Face state-dict key, for the layers this module holds.

    Pipeline keys are ``{layer_index}.{local}`` for ordinary layers and ``tied_modules.{key}.{local}`` for tied
    ones, in DeepSpeed's PipelineModule and in pptk's sequential module alike.
    """
    tied_prefix = {}
    for layer in layers:
        if layer.tied_key and layer.tied_key not in tied_prefix:
            tied_prefix[layer.tied_key] = layer.hf_prefix
    mapping = {}
    for key in module.state_dict():
        head, _, local = key.partition(".")
        if head == "tied_modules":
            tied_key, _, local = local.partition(".")
            mapping[key] = tied_prefix[tied_key] + local
        else:
            mapping[key] = layers[int(head)].hf_prefix + local
    return mapping


def resolve_name(name: str, checkpoint: HFCheckpoint, *, base_model_prefix: str) -> str | None:
    """Find ``name`` in a checkpoint saved from the task model ("transformer.h.0...") or the bare base model ("h.0...")."""
    if name in checkpoint:
        return name
    prefix = base_model_prefix + "."
    if name.startswith(prefix) and name[len(prefix):] in checkpoint:
        return name[len(prefix):]
    if prefix + name in checkpoint:
        return prefix + name
    return None


@torch.no_grad()
def load_stage_weights(module: nn.Module, layers: list[PipeLayer], checkpoint: HFCheckpoint, *,
                       base_model_prefix: str, allow_missing: tuple[str, ...] = ()) -> list[str]:
    """Copy this stage's tensors from the checkpoint; returns the HF names that were absent but allowed.

    Every tensor is checked (present, same shape) before anything is copied, so a bad checkpoint leaves the module
    untouched and the error lists every problem at once.
    """
    state = module.state_dict()
    plan, missing, mismatched, allowed = [], [], [], []
    for key, hf_name in hf_names(module, layers).items():
        found = resolve_name(hf_name, checkpoint, base_model_prefix=base_model_prefix)
        if found is None:
            (allowed if hf_name.startswith(allow_missing) and allow_missing else missing).append(hf_name)
            continue
        tensor = checkpoint.get(found)
        if tuple(tensor.shape) != tuple(state[key].shape):
            mismatched.append(f"{hf_name}: checkpoint {list(tensor.shape)} vs model {list(state[key].shape)}")
            continue
        plan.append((state[key], tensor))
    problems = []
    if missing:
        problems.append(f"missing from {checkpoint.directory}: {', '.join(missing[:10])}"
                        + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:10]))
    if problems:
        raise PptkError(" | ".join(problems) + " -- the checkpoint does not match this config "
                        "(wrong model type or size?); load the config.json saved with those weights")
    for target, tensor in plan:
        target.copy_(tensor.to(target.dtype))
    return allowed
