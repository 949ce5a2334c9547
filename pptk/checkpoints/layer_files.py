# Where a checkpoint keeps each layer's weights and optimizer state, at any tensor-parallel size, and how they are
# read back at another.
"""tp = 1: one file per layer, ``layer_03-model_states.pt`` (DeepSpeed's name) and ``optim_layer_03.pt``.

tp > 1: one file per layer per tp rank, holding that rank's slices: ``layer_03-model_01-model_states.pt``
(DeepSpeed's name when the grid has a model-parallel axis) and ``optim_layer_03-model_01.pt``. Each tp rank writes
its own, so a save never gathers a layer to full size. The manifest's ``tensor_parallel`` entry records the size
and how every sharded tensor was split (per layer, ``{name: [dim, fused]}``), so the converters and a resume at
another tp merge the slices without building the model. A resume at the same tp reads each rank's own files as
they are.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from pptk.checkpoints.integrity import FileLedger
from pptk.errors import PptkError
from pptk.parallel.hf_weights import TensorSource
from pptk.parallel.tensor_parallel import ShardSpec, load_sliced_state, rank_slice, shard_spec, shard_stage
from pptk.parallel.vocab_parallel import VocabShard, is_vocab_layer, shard_vocab

Splits = dict[str, dict[str, list[int]]]  # layer index -> parameter name -> [dim, fused] or [dim, fused, full]


def layer_file(tag_dir: Path, index: int, tp_rank: int | None = None) -> Path:
    model = "" if tp_rank is None else f"-model_{tp_rank:02d}"
    return tag_dir / f"layer_{index:02d}{model}-model_states.pt"


def is_layer_file(name: str) -> bool:
    """A layer's weights (at any tp), what a conversion reads; not its optimizer state."""
    return name.startswith("layer_") and name.endswith("-model_states.pt")


def optim_file(tag_dir: Path, index: int, tp_rank: int | None = None) -> Path:
    model = "" if tp_rank is None else f"-model_{tp_rank:02d}"
    return tag_dir / f"optim_layer_{index:02d}{model}.pt"


def tensor_parallel_entry(layers, tp: int, *, vocab_size: int | None = None) -> dict:
    """The manifest's record of how ``tp`` ranks split ``layers`` (pptk.models.PipeLayer), from a meta-device build
    of each layer: no memory, no process group. ``vocab_size``: the plan splits the vocabulary too."""
    from accelerate import init_empty_weights

    splits: Splits = {}
    for index, layer in enumerate(layers):
        with init_empty_weights(include_buffers=False):
            module = layer.spec.build()
        shard_stage(module, group=None, rank=0, size=tp)
        if vocab_size is not None and is_vocab_layer(layer):
            shard_vocab(module, VocabShard(vocab_size=vocab_size, rank=0, size=tp))
        sharded = {name: _split_entry(spec) for name, p in module.named_parameters() if (spec := shard_spec(p))}
        if sharded:
            splits[str(index)] = sharded
    return {"size": tp, "splits": splits}


def _split_entry(spec: ShardSpec) -> list[int]:
    return [spec.dim, spec.fused, spec.full] if spec.full else [spec.dim, spec.fused]


def saved_tp(manifest: dict) -> int:
    return (manifest.get("tensor_parallel") or {}).get("size", 1)


def open_layer_file(path: Path) -> dict:
    """A layer or optimizer file, memory-mapped: pages are read only for the tensors used, and freed with them."""
    if not path.is_file():
        raise PptkError(f"{path} is missing: the checkpoint is incomplete; use an earlier tag")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise PptkError(f"cannot read {path}: {err}; the file is corrupt") from None


def _specs(manifest: dict, index: int, rank: int = 0) -> dict[str, ShardSpec]:
    """Tp rank ``rank``'s slice of each sharded tensor of layer ``index``, as the manifest records the splits."""
    entry = manifest["tensor_parallel"]
    return {
        name: ShardSpec(dim=split[0], rank=rank, size=entry["size"], fused=split[1], full=split[2] if split[2:] else 0)
        for name, split in entry["splits"].get(str(index), {}).items()
    }


def save_full_layer(state: dict[str, torch.Tensor], files: FileLedger, index: int, manifest: dict) -> None:
    """A full layer's state as the manifest says a checkpoint holds it: one file, or one per tp rank of its slices,
    each recorded in ``files``."""
    tp = saved_tp(manifest)
    if tp == 1:
        files.save(state, layer_file(files.tag_dir, index))
        return
    for rank in range(tp):
        specs = _specs(manifest, index, rank)
        files.save(
            {name: specs[name].take(t) if name in specs else t for name, t in state.items()},
            layer_file(files.tag_dir, index, rank),
        )


def layer_sources(tag_dir: Path, manifest: dict, index: int) -> dict[str, TensorSource]:
    """Layer ``index``'s tensors in full Hugging Face shapes, each read (and merged from its tp slices) only when
    loaded, so an export holds one tensor at a time."""
    tp = saved_tp(manifest)
    if tp == 1:
        path = layer_file(tag_dir, index)
        return {
            name: TensorSource(tuple(t.shape), t.dtype, partial(lambda p, k: open_layer_file(p)[k], path, name))
            for name, t in open_layer_file(path).items()
        }
    paths = [layer_file(tag_dir, index, r) for r in range(tp)]
    specs = _specs(manifest, index)

    def merged(name: str) -> torch.Tensor:
        spec = specs.get(name)
        if spec is None:  # replicated: every rank holds the same copy
            return open_layer_file(paths[0])[name]
        return spec.merge([open_layer_file(p)[name] for p in paths])

    first = open_layer_file(paths[0])
    return {
        name: TensorSource(
            specs[name].full_shape(tuple(t.shape)) if name in specs else tuple(t.shape), t.dtype, partial(merged, name)
        )
        for name, t in first.items()
    }


def read_layer(tag_dir: Path, manifest: dict, index: int) -> dict[str, torch.Tensor]:
    """Layer ``index``'s state in full Hugging Face shapes, whatever tp saved it."""
    return {name: source.load() for name, source in layer_sources(tag_dir, manifest, index).items()}


def _same_split(manifest: dict, tp: int, layer: nn.Module, index: int) -> bool:
    """The checkpoint holds this layer cut exactly as this rank's ``layer`` is (same tp, same tensors split the
    same way: a replicated vocabulary saved by one run, a split one loaded by another, are not)."""
    if tp == 1 or saved_tp(manifest) != tp:
        return False
    own = {name: _split_entry(spec) for name, p in layer.named_parameters() if (spec := shard_spec(p))}
    return own == manifest["tensor_parallel"]["splits"].get(str(index), {})


@torch.no_grad()
def load_rank_layer(layer: nn.Module, tag_dir: Path, manifest: dict, index: int, *, tp_rank: int, tp: int) -> None:
    """Fill this rank's ``layer``: from its own slice file when the checkpoint was saved at this tp, otherwise from
    the full tensors, cut to the rank's slices."""
    if _same_split(manifest, tp, layer, index):
        state = open_layer_file(layer_file(tag_dir, index, tp_rank))
        own = layer.state_dict()
        if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
            raise PptkError(f"{layer_file(tag_dir, index, tp_rank)} does not match the model's layer {index}")
        for name, target in own.items():
            target.copy_(state[name])
        return
    load_sliced_state(layer, read_layer(tag_dir, manifest, index))


def read_optimizer_states(tag_dir: Path, manifest: dict, index: int) -> dict[str, dict[str, torch.Tensor]]:
    """Layer ``index``'s fp32 masters and Adam moments in full Hugging Face shapes, whatever tp saved them."""
    tp = saved_tp(manifest)
    if tp == 1:
        return open_layer_file(optim_file(tag_dir, index))
    specs = _specs(manifest, index)
    shards = [open_layer_file(optim_file(tag_dir, index, r)) for r in range(tp)]
    return {
        name: {
            key: specs[name].merge([shard[name][key] for shard in shards]) if name in specs else value
            for key, value in states.items()
        }
        for name, states in shards[0].items()
    }


def rank_optimizer_states(
    layer: nn.Module, tag_dir: Path, manifest: dict, index: int, *, tp_rank: int, tp: int
) -> dict[str, dict[str, torch.Tensor]]:
    """This rank's fp32 masters and Adam moments for ``layer``, in the shapes of its parameters."""
    if _same_split(manifest, tp, layer, index):
        return open_layer_file(optim_file(tag_dir, index, tp_rank))
    params = dict(layer.named_parameters())
    full = read_optimizer_states(tag_dir, manifest, index)
    return {name: {key: rank_slice(params[name], v) for key, v in states.items()} for name, states in full.items()}
