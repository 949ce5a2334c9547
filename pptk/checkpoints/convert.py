# Hugging Face directory <-> pptk/DeepSpeed pipeline checkpoint, one layer in memory at a time.
from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig

from pptk.checkpoints.integrity import FileLedger, check_files, format_bytes
from pptk.checkpoints.layer_files import is_layer_file, layer_sources, read_layer, save_full_layer
from pptk.checkpoints.safe_writes import publish
from pptk.checkpoints.training import find_checkpoint, manifest_for, read_manifest
from pptk.errors import PptkError
from pptk.models import PipeLayer, first_tied_index
from pptk.models.common import init_layer_like_hf
from pptk.models.heads import hf_model_class
from pptk.parallel.hf_weights import (
    HFCheckpoint,
    TensorSource,
    hf_conversions,
    load_stage_weights,
    to_checkpoint_names,
    write_safetensors,
)
from pptk.parallel.pipeline import ModelSource, plan_pipeline, resolve_model
from pptk.parallel.tensor_parallel import check_tensor_parallel

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


def _one_layer(layers: list[PipeLayer], index: int) -> Any:
    """Layer ``index`` alone, under its pipeline name, so pptk.parallel.hf_weights maps its parameters to HF names."""
    holder = nn.Module()
    layer = layers[index]
    if layer.tied_key:
        holder.tied_modules = nn.ModuleDict({layer.tied_key: layer.spec.build()})
    else:
        holder.add_module(str(index), layer.spec.build())
    return holder


def hf_to_ds(
    src: str | Path,
    dst: str | Path,
    *,
    pp: int = 1,
    tp: int = 1,
    task: str | None = None,
    partition_method: str = "compute",
    seed: int = 1234,
    overwrite: bool = False,
) -> Path:
    """Write a pipeline checkpoint (tag ``step0``) that recipes resume from with ``--resume-from DST``.

    Layer files do not depend on the number of stages; ``pp`` only records the plan in the manifest. At ``tp`` > 1
    each layer is written as ``tp`` slice files, as a tp run saves them (after checking, before anything is written,
    that the model can be split that way); a run at another tp merges and re-cuts them when it resumes. ``task``
    defaults to the one ``config.architectures`` names (pptk.models.heads.infer_task). A destination that already holds
    checkpoints is refused unless ``overwrite``: pointing its ``latest`` at step0 would make a resume restart
    from zero.
    """
    check_checkpoint_destination(Path(dst), overwrite=overwrite)
    source = resolve_model(src)
    if source.pretrained_dir is None:
        raise PptkError(f"{src} has no weights (model.safetensors or an index); hf-to-ds needs a model directory")
    plan = plan_pipeline(source, num_stages=pp, task=task, partition_method=partition_method, tp=tp)
    check_tensor_parallel(plan.config, tp)  # (plan_pipeline checks it too, once it has read the config)
    checkpoint = HFCheckpoint(source.pretrained_dir, conversions=hf_conversions(plan.hf_class, plan.config))
    dst = Path(dst)
    tag_dir = dst / "step0"
    partial = dst / "step0.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    files = FileLedger(partial)
    first = first_tied_index(plan.layers)
    optional = tuple(layer.hf_prefix for layer in plan.layers if layer.optional)
    manifest = manifest_for(plan, step=0, layout=None, tp=tp)
    for index, layer in enumerate(plan.layers):
        if layer.tied_key and first[layer.tied_key] != index:
            continue  # DeepSpeed saves a tied module once, at its first layer
        holder = _one_layer(plan.layers, index)
        for module in holder.children():
            init_layer_like_hf(module, config=plan.config, hf_class=plan.hf_class, seed=seed + index)
        load_stage_weights(
            holder, plan.layers, checkpoint, base_model_prefix=plan.hf_class.base_model_prefix, allow_missing=optional
        )
        (module,) = holder.tied_modules.values() if layer.tied_key else holder.children()
        save_full_layer(module.state_dict(), files, index, manifest)
        del holder, module  # release this layer before the next one is built
        if files.failure is not None:
            shutil.rmtree(partial, ignore_errors=True)
            weights = sum(p.stat().st_size for p in Path(source.pretrained_dir).glob("*.safetensors"))
            fix = files.failure.fix(elsewhere="another destination")
            raise PptkError(
                f"could not write {partial.name} in {dst}: {files.failure.describe()}; the layer files need about "
                f"{format_bytes(weights)} there: {fix} and convert again"
            )
    manifest["files"] = dict(sorted(files.files.items()))
    publish(partial, tag_dir, manifest, retry="convert again")  # --overwrite: the old step0 goes only now
    return tag_dir


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def config_from_manifest(manifest: dict):
    raw = dict(manifest["hf_config"])
    model_type = raw.pop("model_type")
    return AutoConfig.for_model(model_type, **raw)


def check_checkpoint_destination(dst: Path, *, overwrite: bool) -> None:
    """hf-to-ds must not repoint an existing run's ``latest`` unless asked to."""
    held = sorted(p.name for p in dst.glob("step*")) + (["latest"] if (dst / "latest").exists() else [])
    if held and not overwrite:
        raise PptkError(
            f"{dst} already holds checkpoints ({', '.join(held[:4])}); converting into it would point its latest "
            "at step0, so --resume-from would restart from zero. Choose an empty directory, or pass --overwrite"
        )


def check_export_destination(dst: Path, *, overwrite: bool) -> None:
    """An export goes into an empty or new directory, or replaces a previous export when ``overwrite``; never
    into a directory of other files (and never beside an older export's shards and index)."""
    if not dst.exists():
        return
    if not dst.is_dir():
        raise PptkError(f"{dst} is a file; give a directory to export into")
    present = sorted(p.name for p in dst.iterdir())
    if present and not overwrite:
        raise PptkError(
            f"{dst} is not empty ({', '.join(present[:4])}{', ...' if len(present) > 4 else ''}); an export "
            "beside older files (shards, an index) would load differently in pptk and transformers. Choose a new "
            "directory, or pass --overwrite to replace it"
        )
    if present and not (dst / "config.json").is_file():
        raise PptkError(
            f"{dst} holds files that are not a Hugging Face export ({', '.join(present[:4])}); --overwrite replaces "
            "only a previous export: choose a new directory"
        )


def ds_to_hf(
    src: str | Path,
    dst: str | Path,
    *,
    max_shard_size: str | int = "2GB",
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a pipeline checkpoint to a directory ``AutoModelFor<task>.from_pretrained`` loads.

    Streams layer files into safetensors shards (sharded with an index when over ``max_shard_size``), so memory
    stays at about one shard. Tokenizer files come from ``tokenizer`` or the run's ``hf_config/`` directory.
    The export is written beside ``dst`` and renamed into place when complete; with ``overwrite`` it replaces a
    previous export whole, so no stale shard or index survives.
    """
    final = Path(dst)
    check_export_destination(final, overwrite=overwrite)
    tag_dir = find_checkpoint(src)
    manifest = read_manifest(tag_dir)
    refuse_lora_checkpoint(tag_dir, manifest)
    check_files(tag_dir, manifest, only=is_layer_file)  # the files an export reads, before anything is written
    config = config_from_manifest(manifest)
    hf_class = hf_model_class(config, manifest["task"])
    conversions = hf_conversions(hf_class, config)
    dst = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    # Plan the shards from shapes alone (mmap: no tensor data is read), then write them tensor by tensor.
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, TensorSource]] = [{}]
    shard_bytes, seen_ties = 0, set()
    for layer in manifest["layers"]:
        if layer["tied_key"]:
            if layer["tied_key"] in seen_ties:
                continue
            seen_ties.add(layer["tied_key"])
        sources = {
            layer["hf_prefix"] + local: s for local, s in layer_sources(tag_dir, manifest, layer["index"]).items()
        }
        for name, source in _as_saved(sources, conversions, config).items():
            size = source.numel * source.dtype.itemsize
            if shards[-1] and shard_bytes + size > limit:
                shards.append({})
                shard_bytes = 0
            shards[-1][name] = source
            shard_bytes += size
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, tensors in zip(names, shards):
        write_safetensors(dst / name, tensors, metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {tensor: name for name, tensors in zip(names, shards) for tensor in tensors}
        total = sum((dst / name).stat().st_size for name in names)
        (dst / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    config.architectures = [hf_class.__name__]
    # what the tensors are stored in (bf16 after a bf16 run), so from_pretrained's dtype="auto" loads them as such
    floating = [t.dtype for shard in shards for t in shard.values() if t.dtype.is_floating_point]
    if floating:
        config.dtype = max(set(floating), key=floating.count)
    config.save_pretrained(dst)
    tokenizer_dir = Path(tokenizer) if tokenizer else tag_dir.parent.parent / "hf_config"
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, dst / name)
    if final.exists():  # checked above: empty, or a previous export being overwritten
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        dst.rename(final)
        shutil.rmtree(old)
    else:
        dst.rename(final)
    return final


def _as_saved(sources: dict[str, TensorSource], conversions: list, config) -> dict[str, TensorSource]:
    """One layer's tensors under the names and in the shapes ``save_pretrained`` writes (mixture-of-experts: one
    tensor per expert, split from the fused ones by transformers' own reversal). Names and shapes come from meta
    tensors; the data from one reversal of the whole layer, kept while its tensors are written one after another."""
    if not conversions:
        return sources
    meta = {name: torch.empty(s.shape, dtype=s.dtype, device="meta") for name, s in sources.items()}
    saved = to_checkpoint_names(meta, conversions, config)
    if set(saved) == set(sources):
        return sources
    reverted: dict[str, torch.Tensor] = {}

    def load(name: str) -> torch.Tensor:
        if name not in reverted:  # the first tensor of this layer asked for: revert the layer once
            reverted.clear()
            reverted.update(to_checkpoint_names({n: s.load() for n, s in sources.items()}, conversions, config))
        return reverted.pop(name)

    return {name: TensorSource(tuple(t.shape), t.dtype, partial(load, name)) for name, t in saved.items()}


def load_sequential_from_checkpoint(src: str | Path):
    """The whole model in one process from a pipeline checkpoint (tests, small exports): (plan, SequentialPipe)."""
    from pptk.parallel.pipeline import SequentialPipe

    tag_dir = find_checkpoint(src)
    manifest = read_manifest(tag_dir)
    refuse_lora_checkpoint(tag_dir, manifest)
    check_files(tag_dir, manifest, only=is_layer_file)
    config = config_from_manifest(manifest)
    plan = plan_pipeline(ModelSource(config, None, str(tag_dir)), num_stages=1, task=manifest["task"])
    module = SequentialPipe(plan.layers)
    first = first_tied_index(plan.layers)
    for key, tied in module.tied_modules.items():
        tied.load_state_dict(read_layer(tag_dir, manifest, first[key]))
    for name, child in module.named_children():
        if name.isdigit():
            child.load_state_dict(read_layer(tag_dir, manifest, int(name)))
    return plan, module


def refuse_lora_checkpoint(tag_dir: Path, manifest: dict) -> None:
    """A LoRA run's layer files hold its adapters, not full weights: reading them as a model would be garbage."""
    if manifest.get("lora"):
        raise PptkError(
            f"{tag_dir} holds LoRA adapters, not full weights: `pptk convert ds-to-hf` merges them into the base "
            "(pptk.checkpoints.lora_convert.export_merged); `pptk convert ds-to-adapter` writes the adapter"
        )
