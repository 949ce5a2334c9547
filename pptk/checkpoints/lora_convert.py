# Out of a LoRA checkpoint: the PEFT adapter directory, and the merged Hugging Face model (base + adapters, in fp32).
"""``export_adapter`` reads only the checkpoint's ``lora_layer_*.pt`` files and writes ``adapter_config.json`` +
``adapter_model.safetensors`` (``pptk.parallel.lora_export.write_adapter_dir``), which
``PeftModel.from_pretrained(AutoModelFor...from_pretrained(BASE), DIR)`` loads.

``export_merged`` rebuilds the whole model in one process from the base (the manifest's ``base_model`` directory, or
``base=``; a base without a directory is rebuilt from the run's seed), puts the checkpoint's adapters on it, folds
them into the base weights in fp32 (``merge_lora``: base + B @ A x scaling, as peft's ``merge_and_unload``) and
writes one ``model.safetensors`` in fp32 with the config and tokenizer. It holds the model once in fp32: the
full-model export (``pptk.checkpoints.convert.ds_to_hf``) streams layer by layer, this one does not yet.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from pptk.checkpoints.convert import TOKENIZER_FILES, check_export_destination, config_from_manifest
from pptk.checkpoints.integrity import check_files
from pptk.checkpoints.layer_files import open_layer_file
from pptk.checkpoints.lora_checkpoint import is_lora_layer_file, lora_layer_file
from pptk.checkpoints.training import check_compatible, find_checkpoint, read_manifest
from pptk.errors import PptkError
from pptk.parallel.lora import LoraSettings, apply_lora, settings_from_record
from pptk.parallel.lora_export import load_adapter_state_dict, merge_lora, peft_key, write_adapter_dir
from pptk.parallel.pipeline import ModelSource, build_sequential_module, local_layers, plan_pipeline, resolve_model


def check_adapter_destination(dst: Path) -> None:
    """An adapter directory is written into a new or empty directory only: peft would load whatever else is there."""
    if not dst.exists():
        return
    if not dst.is_dir():
        raise PptkError(f"{dst} is a file; give a new or empty directory for the adapter")
    present = sorted(p.name for p in dst.iterdir())
    if present:
        raise PptkError(
            f"{dst} is not empty ({', '.join(present[:4])}{', ...' if len(present) > 4 else ''}); the adapter "
            "export writes into a new or empty directory only: choose another, or empty it"
        )


def is_lora_checkpoint(src: str | Path) -> bool:
    return bool(read_manifest(find_checkpoint(src)).get("lora"))


def open_lora_checkpoint(src: str | Path) -> tuple[Path, dict, LoraSettings]:
    """(tag directory, manifest, settings) of a LoRA checkpoint whose adapter files match their checksums."""
    tag_dir = find_checkpoint(src)
    manifest = read_manifest(tag_dir)
    if not manifest.get("lora"):
        raise PptkError(
            f"{tag_dir} is a full checkpoint, without LoRA adapters: export it with `pptk convert ds-to-hf`"
        )
    check_files(tag_dir, manifest, only=is_lora_layer_file)
    return tag_dir, manifest, settings_from_record(manifest["lora"])


def read_adapter_state(tag_dir: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """The whole adapter (every layer's trained tensors), keyed as peft saves it."""
    state = {}
    for entry in manifest["layers"]:
        path = lora_layer_file(tag_dir, entry["index"])
        if path.is_file():  # layers with nothing trained, and a tied layer's later copies, have none
            for local, tensor in open_layer_file(path).items():
                state[peft_key(entry["hf_prefix"], local)] = tensor
    return state


def export_adapter(src: str | Path, dst: str | Path) -> Path:
    """The PEFT adapter directory of a LoRA checkpoint (``runs/x/checkpoints`` or ``.../stepN``)."""
    dst = Path(dst)
    check_adapter_destination(dst)
    tag_dir, manifest, settings = open_lora_checkpoint(src)
    config = config_from_manifest(manifest)
    config._name_or_path = manifest.get("base_model") or ""  # adapter_config.json's base_model_name_or_path
    return write_adapter_dir(read_adapter_state(tag_dir, manifest), settings, config, dst, task=manifest["task"])


def merged_model(src: str | Path, *, base: str | Path | None = None):
    """(plan, SequentialPipe) of a LoRA checkpoint in one process: the base with the adapters merged into it."""
    tag_dir, manifest, settings = open_lora_checkpoint(src)
    base = base if base is not None else manifest.get("base_model")
    seed = manifest.get("run_config", {}).get("seed", 1234)
    if base is not None:
        if not Path(base).is_dir():
            raise PptkError(
                f"the base model {base} the adapters were trained on is not there; pass its directory with --base DIR"
            )
        source = resolve_model(base)
        if source.pretrained_dir is None:
            raise PptkError(f"{base} holds no weights (model.safetensors); the merge needs the base model's weights")
    else:  # the run initialised its base from the seed; so does the merge
        source = ModelSource(config_from_manifest(manifest), None, f"base initialised from seed {seed}")
    plan = plan_pipeline(source, num_stages=1, task=manifest["task"], dropout=False)
    check_compatible(manifest, plan)
    module = build_sequential_module(plan, seed=seed)
    apply_lora(module, plan, settings, seed=seed)
    load_adapter_state_dict(module, plan, read_adapter_state(tag_dir, manifest))
    merge_lora(module, plan)
    return plan, module.eval()


def export_merged(
    src: str | Path,
    dst: str | Path,
    *,
    base: str | Path | None = None,
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """The merged model as a Hugging Face directory (fp32, one ``model.safetensors``), written beside ``dst`` and
    renamed into place when complete; ``overwrite`` replaces a previous export, as ``ds_to_hf`` does."""
    from safetensors.torch import save_file

    final = Path(dst)
    check_export_destination(final, overwrite=overwrite)
    tag_dir = find_checkpoint(src)
    plan, module = merged_model(tag_dir, base=base)
    tensors = {
        plan.layers[index].hf_prefix + local: tensor.detach().float().contiguous()
        for index, layer_module in local_layers(module, plan.layers)
        for local, tensor in layer_module.state_dict().items()
    }
    partial = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    config = config_from_manifest(read_manifest(tag_dir))
    config.architectures = [plan.hf_class.__name__]
    config.dtype = torch.float32
    config.save_pretrained(partial)
    base_dir = plan.source.pretrained_dir
    # the run's tokenizer (saved beside its checkpoints), else the base model's
    sources = [Path(tokenizer)] if tokenizer else [tag_dir.parent.parent / "hf_config", *filter(None, [base_dir])]
    tokenizer_dir = next((d for d in sources if any((d / name).is_file() for name in TOKENIZER_FILES)), None)
    for name in TOKENIZER_FILES:
        if tokenizer_dir is not None and (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, partial / name)
    if final.exists():  # checked above: empty, or a previous export being overwritten
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        partial.rename(final)
        shutil.rmtree(old)
    else:
        partial.rename(final)
    return final
