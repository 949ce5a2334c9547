# LoRA checkpoints: only what trains (adapters, modules_to_save) and its optimizer state, one file per layer; the frozen
# base is rebuilt from its own model directory when a run resumes.
"""A LoRA run's tag holds, beside the manifest and the RNG files::

    lora_layer_03.pt     the layer's trained tensors under their names inside the layer (peft's
                         ``self_attn.q_proj.lora_A.default.weight``, a module trained in full under its own name), in
                         the run's precision; never a frozen weight, never a stage's zero placeholder
    optim_layer_03.pt    their fp32 master weights and Adam moments (the per-layer optimizer files of full checkpoints)

Layers with nothing to train (embeddings, norms, a tied head) have no file. Like the per-layer files of a full
checkpoint they do not depend on the layout, so a LoRA run resumes on any pp and dp. The manifest records the LoRA
settings (``lora``) and the base model's directory (``base_model``, resolved; None for a base initialised from the
run's seed): a resume, ``pptk convert`` and the exports rebuild the base from it (``pptk.checkpoints.lora_convert``).
Files are recorded and checked like every checkpoint file (``pptk.checkpoints.integrity``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pptk import deepspeed_compat as compat
from pptk.checkpoints.integrity import FileLedger
from pptk.checkpoints.layer_files import open_layer_file, optim_file
from pptk.deepspeed_compat import ADAM_STATES
from pptk.errors import PptkError
from pptk.parallel.lora import LoraSettings, resolve_lora_targets, settings_from_record, settings_record
from pptk.parallel.lora_stage import PLACEHOLDER
from pptk.parallel.pipeline import PipelinePlan, local_layers


def lora_layer_file(tag_dir: Path, index: int) -> Path:
    return tag_dir / f"lora_layer_{index:02d}.pt"


def is_lora_layer_file(name: str) -> bool:
    return name.startswith("lora_layer_") and name.endswith(".pt")


def trained_parameters(layer_module: nn.Module) -> dict[str, nn.Parameter]:
    """What a LoRA checkpoint keeps of a layer: its trainable parameters, the stage's placeholder aside (a zero that
    only keeps DeepSpeed's optimizer busy; a resume on another layout may put it elsewhere, or nowhere)."""
    return {
        name: p for name, p in layer_module.named_parameters() if p.requires_grad and name.split(".")[-1] != PLACEHOLDER
    }


def base_model_of(plan: PipelinePlan) -> str | None:
    directory = plan.source.pretrained_dir
    return str(Path(directory).resolve()) if directory is not None else None


def lora_manifest_entries(settings: LoraSettings, plan: PipelinePlan) -> dict:
    return {"lora": settings_record(settings), "base_model": base_model_of(plan)}


def save_lora_layers(engine, layer_modules, files: FileLedger) -> None:
    """Each of this stage's layers with something trained: its tensors and their optimizer state. Collective over
    the dp group (every replica reads its optimizer partition), written by replica 0. ``layer_modules``: the
    (index, module) pairs this stage writes."""
    write = engine.grid.get_data_parallel_rank() == 0
    for index, layer_module in layer_modules:
        params = trained_parameters(layer_module)
        if not params:
            continue
        states = {
            name: {key: compat.get_param_state(engine.optimizer, p, key) for key in ("fp32", *ADAM_STATES)}
            for name, p in params.items()
        }
        if write:
            tensors = {name: p.detach().cpu().clone() for name, p in params.items()}
            files.save(tensors, lora_layer_file(files.tag_dir, index))
            files.save(states, optim_file(files.tag_dir, index))


def load_lora_state(engine, plan: PipelinePlan, tag_dir: Path) -> None:
    """Copy the saved trained tensors into this stage's layers (the base is already loaded, from its directory), then
    their exact fp32 masters and Adam moments into whatever optimizer partition this rank holds."""
    trained = _load_lora_layers(engine, plan, tag_dir)
    compat.refresh_master_weights(engine.optimizer)  # the placeholder's too; the saved masters follow
    compat.materialise_optimizer_states(engine.optimizer)
    for index, layer_module in trained:
        params = trained_parameters(layer_module)
        for name, per_key in open_layer_file(optim_file(tag_dir, index)).items():
            for key, value in per_key.items():
                compat.set_param_state(engine.optimizer, params[name], key, value)


@torch.no_grad()
def _load_lora_layers(engine, plan: PipelinePlan, tag_dir: Path) -> list[tuple[int, nn.Module]]:
    loaded = []
    for index, layer_module in local_layers(engine.module, plan.layers):
        params = trained_parameters(layer_module)
        if not params:
            continue
        path = lora_layer_file(tag_dir, index)
        state = open_layer_file(path)
        mismatched = sorted(set(params) ^ set(state)) + [
            f"{name} {list(state[name].shape)} vs {list(p.shape)}"
            for name, p in params.items()
            if name in state and state[name].shape != p.shape
        ]
        if mismatched:
            raise PptkError(
                f"{path} does not fit layer {index} under these LoRA settings ({', '.join(mismatched[:4])}); resume "
                "with the model and --lora-* flags the checkpoint was trained with"
            )
        for name, p in params.items():
            p.copy_(state[name])
        loaded.append((index, layer_module))
    return loaded


def check_lora_run(settings: LoraSettings, plan: PipelinePlan, *, export_adapter: Path | None) -> str:
    """Before any rank starts: what the settings select in this model (or the error saying why they cannot), and a
    new or empty --export-adapter directory. Returns the line for the run's start-up log."""
    from pptk.checkpoints.lora_convert import check_adapter_destination

    targets = resolve_lora_targets(plan.layers, settings, task=plan.task)
    if export_adapter is not None:
        check_adapter_destination(export_adapter)
    return f"\n{targets.describe()} (r={settings.r}, alpha={settings.alpha:g}); the base weights are frozen"


def check_lora_resume(manifest: dict, settings: LoraSettings | None, plan: PipelinePlan, *, seed: int) -> None:
    """Before any rank starts: a LoRA checkpoint resumes only as the same LoRA run on the same base, a full one only
    in full."""
    saved = manifest.get("lora")
    if saved is None and settings is None:
        return
    if saved is None:
        raise PptkError(
            "the checkpoint holds full weights, not LoRA adapters, so it cannot resume a LoRA run (--lora-r). To put "
            "adapters on those weights, export them (pptk convert ds-to-hf CKPT DIR) and start a LoRA run with "
            "--model DIR; or resume it without --lora-*"
        )
    if settings is None:
        raise PptkError(
            f"the checkpoint holds LoRA adapters ({_flags(settings_from_record(saved))}) on a frozen base, not full "
            "weights: resume it with those flags, or export the merged model (pptk convert ds-to-hf CKPT DIR) and "
            "train that in full with --model DIR"
        )
    wanted = settings_from_record(saved)
    if wanted != settings:
        raise PptkError(
            f"the checkpoint's adapters were trained with {_flags(wanted)}, this run asks for {_flags(settings)}; "
            "resume with the checkpoint's LoRA flags (other settings make other adapters)"
        )
    base, ours = manifest.get("base_model"), base_model_of(plan)
    if base != ours:
        if base is None:
            trained_on = "a base initialised from --seed, not a model directory"
        else:
            trained_on = f"the base model {base}"
        raise PptkError(
            f"the checkpoint's adapters were trained on {trained_on}; this run's --model is "
            f"{ours or 'a base initialised from --seed'}. Resume with --model {base or 'TYPE (the same model type)'}"
        )
    saved_seed = manifest.get("run_config", {}).get("seed")
    if base is None and saved_seed is not None and saved_seed != seed:
        raise PptkError(
            f"the checkpoint's base was initialised from --seed {saved_seed} (it has no model directory); resume with "
            f"--seed {saved_seed}"
        )


def _flags(settings: LoraSettings) -> str:
    targets = settings.target_modules
    return (
        f"--lora-r {settings.r} --lora-alpha {settings.alpha:g} --lora-dropout {settings.dropout:g} "
        f"--lora-target-modules {targets if isinstance(targets, str) else ' '.join(targets)}"
        + (f" --lora-modules-to-save {' '.join(settings.modules_to_save)}" if settings.modules_to_save else "")
    )
