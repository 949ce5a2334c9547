# Hugging Face weights into pipeline stages: each rank reads only its own tensors from (sharded) safetensors.
from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from pptk.errors import PptkError
from pptk.models import PipeLayer
from pptk.parallel.tensor_parallel import ShardSpec, shard_spec

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def _bytes_of(tensor: torch.Tensor):
    """A writable byte view of a contiguous CPU tensor's storage (no copy)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


class SafetensorsFile:
    """Reads tensors of one .safetensors file with plain file reads, straight into their destination.

    safetensors' own safe_open memory-maps the file, and every page touched stays in the process's resident set
    while the file is open: loading a stage would then cost its weights twice. Reading with readinto into the
    parameter's storage costs nothing beyond the parameter itself.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if not 0 < header_len < 100 * 2**20:
                    raise ValueError(f"implausible header length {header_len}")
                header = json.loads(f.read(header_len))
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise PptkError(
                f"cannot read {path}: {err}; the file is corrupt or truncated, re-download or re-save it"
            ) from None
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries = header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self.entries[name]["dtype"]]

    def read_into(self, name: str, target: torch.Tensor) -> None:
        """Fill ``target`` (same shape; any dtype) with the tensor; no extra copy when the dtypes agree."""
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        same = target.dtype == self.dtype(name) and target.is_contiguous() and target.device.type == "cpu"
        buffer = target if same else torch.empty(self.shape(name), dtype=self.dtype(name))
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            got = f.readinto(memoryview(_bytes_of(buffer)))
        if got != end - begin:
            raise PptkError(f"{self.path} is truncated: tensor {name} has {got} of {end - begin} bytes; re-download")
        if not same:
            target.copy_(buffer)

    def get(self, name: str) -> torch.Tensor:
        tensor = torch.empty(self.shape(name), dtype=self.dtype(name))
        self.read_into(name, tensor)
        return tensor

    def read_slice_into(self, name: str, target: torch.Tensor, spec: ShardSpec) -> None:
        """Fill ``target`` with this tensor-parallel rank's slice (``spec``) of the tensor, reading only its bytes.

        The slice of each piece along ``spec.dim`` is, for every index of the dimensions before it, one contiguous
        run of the file: each run is read straight into its place in ``target`` (through a run-sized buffer when
        the dtypes differ). safetensors' ``get_slice`` would map the file, keep every page a strided slice touches
        resident while it is open, and return a copy to be copied again.
        """
        shape, dtype = self.shape(name), self.dtype(name)
        begin, _ = self.entries[name]["data_offsets"]
        outer = math.prod(shape[: spec.dim])
        inner = math.prod(shape[spec.dim + 1 :])
        dest = target.view(outer, target.shape[spec.dim], inner)  # target is a parameter: contiguous
        same = target.dtype == dtype and target.device.type == "cpu"
        if spec.full:  # a padded slice (a vocabulary tp does not divide): the rows past the file's are zeros
            target.zero_()
        column = 0
        with open(self.path, "rb") as f:
            for first, last in spec.ranges(shape[spec.dim]):
                width = last - first
                for row in range(outer):
                    run = dest[row, column : column + width]
                    buffer = run if same else torch.empty((width, inner), dtype=dtype)
                    f.seek(self.data_start + begin + (row * shape[spec.dim] + first) * inner * dtype.itemsize)
                    want = width * inner * dtype.itemsize
                    if f.readinto(memoryview(_bytes_of(buffer))) != want:
                        raise PptkError(f"{self.path} is truncated inside tensor {name}; re-download")
                    if not same:
                        run.copy_(buffer)
                column += width


def write_safetensors(path: Path, tensors: dict[str, TensorSource], *, metadata: dict | None = None) -> None:
    """Write a .safetensors file tensor by tensor; each value is a zero-argument callable returning the tensor, so
    only one tensor needs to be in memory at a time. ``shapes`` come from ``TensorSource``."""
    header, offset = {}, 0
    for name in sorted(tensors):
        source = tensors[name]
        size = source.numel * source.dtype.itemsize
        header[name] = {
            "dtype": _NAMES[source.dtype],
            "shape": list(source.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data must start 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name in sorted(tensors):
            f.write(memoryview(_bytes_of(tensors[name].load().contiguous())))


@dataclass(frozen=True)
class TensorSource:
    """A tensor's shape and dtype now, its data later (``load``): lets writers plan a file before reading it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class HFCheckpoint:
    """A local Hugging Face checkpoint: the index is read up front, tensors only when asked for, shard by shard.

    conversions: transformers' conversion mapping for the model (``hf_conversions``). Tensors are then also found
    under the names the model holds them by, as ``from_pretrained`` converts them: Mixtral's or Qwen-MoE's experts,
    one tensor per expert on disk, read and fused into the 3-D ``experts.gate_up_proj`` / ``experts.down_proj``.
    """

    def __init__(self, directory: str | Path, *, conversions: Sequence = ()):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        self._files: dict[str, SafetensorsFile] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise PptkError(f"{index} is not a valid safetensors index ({err}); re-save the model") from None
            self._shard_of = dict(weight_map)
        elif single.is_file():
            self._shard_of = dict.fromkeys(self._file(SINGLE_FILE).entries, SINGLE_FILE)
        else:
            found = sorted(p.name for p in self.directory.glob("*")) if self.directory.is_dir() else []
            hint = (
                ("it has PyTorch .bin weights: re-save with `model.save_pretrained(dir)` (safetensors is the default)")
                if any(n.endswith(".bin") for n in found)
                else "point to a Hugging Face model directory"
            )
            raise PptkError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.directory} (found: {found[:8]}); {hint}")

        self._converted = _converted_names(list(self._shard_of), conversions)

    def _file(self, shard: str) -> SafetensorsFile:
        if shard not in self._files:
            path = self.directory / shard
            if not path.is_file():
                raise PptkError(f"{INDEX_FILE} lists shard {shard} but {path} is missing; re-download the model")
            self._files[shard] = SafetensorsFile(path)
        return self._files[shard]

    def keys(self) -> list[str]:
        return list(self._shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of or name in self._converted

    def _entry(self, name: str) -> SafetensorsFile:
        file = self._file(self._shard_of[name])
        if name not in file.entries:
            raise PptkError(
                f"{INDEX_FILE} places {name} in {file.path.name}, which does not hold it; re-save the model"
            )
        return file

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._shard_of:
            return self._entry(name).shape(name)
        meta = {
            key: torch.empty(self._entry(key).shape(key), device="meta") for _, key in self._converted[name].sources
        }
        return tuple(self._converted[name].apply(name, meta.__getitem__).shape)

    def read_into(self, name: str, target: torch.Tensor) -> None:
        if name in self._shard_of:
            self._entry(name).read_into(name, target)
        else:
            target.copy_(self.get(name))

    def get(self, name: str) -> torch.Tensor:
        if name in self._shard_of:
            return self._entry(name).get(name)
        return self._converted[name].apply(name, lambda key: self._entry(key).get(key))

    def read_slice_into(self, name: str, target: torch.Tensor, spec: ShardSpec) -> None:
        """Fill ``target`` with this tensor-parallel rank's slice only; the checkpoint's shape was checked against
        ``spec.full_shape`` beforehand."""
        if name not in self._shard_of:  # tp > 1 is refused for mixture-of-experts models (check_tensor_parallel)
            raise PptkError(f"{name} is fused from several tensors of {self.directory}; it cannot be read in slices")
        self._entry(name).read_slice_into(name, target, spec)


def hf_conversions(hf_class: type, config) -> list:
    """The renames and fusions transformers applies to this model's checkpoint when it loads it (its conversion
    mapping, looked up as ``get_model_conversion_mapping`` does for a root model: class name, then model type).
    Empty for most dense families; the expert fusions of the mixture-of-experts ones."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    found = get_checkpoint_conversion_mapping(hf_class.__name__) or get_checkpoint_conversion_mapping(config.model_type)
    return list(found or [])


def to_checkpoint_names(state: dict[str, torch.Tensor], conversions: Sequence, config) -> dict[str, torch.Tensor]:
    """Tensors under their model names -> what ``save_pretrained`` writes for them (transformers' own reversal of
    its conversion mapping: fused experts split back into one tensor per expert). Works on meta tensors too, to
    learn the names and shapes without data. ``state`` holds whole layers: a fusion's parts must all be there."""
    if not conversions:
        return state
    from transformers.core_model_loading import revert_weight_conversion

    # revert_weight_conversion reads the conversions a model was loaded with, and its config, from the model
    holder = SimpleNamespace(_weight_conversions=list(conversions), config=config)
    return revert_weight_conversion(holder, state)


@dataclass(frozen=True)
class ConvertedTensor:
    """One tensor as the model holds it, made by transformers' ``converter`` from checkpoint tensors ``sources``
    ((source pattern, name on disk), in the order from_pretrained collects them); converter None: a rename."""

    converter: Any
    sources: tuple[tuple[str, str], ...]

    def apply(self, name: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        if self.converter is None:
            return read(self.sources[0][1])
        converter = copy.deepcopy(self.converter)  # it collects tensors: one fresh copy per target, as HF does
        for pattern, key in self.sources:
            converter.add_tensor(name, key, pattern, partial(read, key))
        produced = converter.convert(name)
        if name not in produced:
            raise PptkError(f"transformers' conversion for {name} produced {sorted(produced)}, not {name}")
        return produced[name]


def _converted_names(keys: list[str], conversions: Sequence) -> dict[str, ConvertedTensor]:
    """Model name -> how to read it, for every checkpoint name the conversions rename or fuse."""
    if not conversions:
        return {}
    from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

    renamings = [c for c in conversions if not isinstance(c, WeightConverter)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    sources: dict[str, list[tuple[str, str]]] = {}
    kind: dict[str, Any] = {}
    for key in sorted(keys, key=dot_natural_key):  # experts 0, 1, ..., 10 in order, as from_pretrained reads them
        renamed, pattern = rename_source_key(key, renamings, converters)
        if renamed == key:
            continue
        sources.setdefault(renamed, []).append((pattern or key, key))
        kind[renamed] = by_pattern[pattern] if pattern is not None else None
    return {name: ConvertedTensor(kind[name], tuple(found)) for name, found in sources.items()}


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
    """Find ``name`` in a checkpoint saved from the task model ("transformer.h.0...") or the bare base model
    ("h.0...")."""
    if name in checkpoint:
        return name
    prefix = base_model_prefix + "."
    if name.startswith(prefix) and name[len(prefix) :] in checkpoint:
        return name[len(prefix) :]
    if prefix + name in checkpoint:
        return prefix + name
    return None


@torch.no_grad()
def load_stage_weights(
    module: nn.Module,
    layers: list[PipeLayer],
    checkpoint: HFCheckpoint,
    *,
    base_model_prefix: str,
    allow_missing: tuple[str, ...] = (),
) -> list[str]:
    """Copy this stage's tensors from the checkpoint; returns the HF names that were absent but allowed.

    Every tensor is checked (present, same shape) before anything is copied, so a bad checkpoint leaves the module
    untouched and the error lists every problem at once.
    """
    state = module.state_dict()
    shards = {key: spec for key, p in module.named_parameters() if (spec := shard_spec(p)) is not None}
    plan: list[tuple[torch.Tensor, str, ShardSpec | None]] = []
    missing: list[str] = []
    mismatched: list[str] = []
    allowed: list[str] = []
    for key, hf_name in hf_names(module, layers).items():
        found = resolve_name(hf_name, checkpoint, base_model_prefix=base_model_prefix)
        if found is None:
            (allowed if hf_name.startswith(allow_missing) and allow_missing else missing).append(hf_name)
            continue
        shape = checkpoint.shape(found)
        spec = shards.get(key)
        expected = spec.full_shape(tuple(state[key].shape)) if spec else tuple(state[key].shape)
        if shape != expected:
            mismatched.append(f"{hf_name}: checkpoint {list(shape)} vs model {list(expected)}")
            continue
        plan.append((state[key], found, spec))
    problems = []
    if missing:
        problems.append(
            f"missing from {checkpoint.directory}: {', '.join(missing[:10])}"
            + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
        )
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:10]))
    if problems:
        raise PptkError(
            " | ".join(problems) + " -- the checkpoint does not match this config "
            "(wrong model type or size?); load the config.json saved with those weights"
        )
    for target, name, spec in plan:
        if spec is not None:
            checkpoint.read_slice_into(name, target, spec)  # this tp rank's slice only
        else:
            checkpoint.read_into(name, target)  # straight into the parameter's storage
    return allowed
