# Training checkpoints: safe saves (`latest` moves last), exact resume, and resume on a different layout.
"""A pptk checkpoint is a DeepSpeed pipeline checkpoint plus a few files that make it self-describing::

    checkpoints/
      latest                          the newest *complete* tag; replaced atomically, after every rank finished
      step200/
        pptk.json                     manifest: model type, task, HF config, layers, layout, step, scheduler state,
                                      and every other file's size and sha256 (pptk.checkpoints.integrity)
        layer_00-model_states.pt ...  DeepSpeed: one file per layer (so weights load under any number of stages);
                                      at tp > 1 one per layer and tp rank, layer_00-model_01-model_states.pt
        mp_rank_00_model_states.pt    DeepSpeed: engine state per stage
        zero_pp_rank_*_optim_states.pt  DeepSpeed: ZeRO-1 optimizer shards, valid for this layout only
        optim_layer_00.pt ...         pptk: per-layer fp32 weights and Adam moments, valid for any layout
                                      (optim_layer_00-model_01.pt at tp > 1; see pptk.checkpoints.layer_files)
        rng_rank0.pt ...              pptk: each rank's RNG states, for an exact resume on the same layout

A LoRA run saves only what trains (``lora_layer_03.pt`` + ``optim_layer_03.pt`` per layer with adapters or
modules_to_save, no DeepSpeed engine or ZeRO files) and rebuilds the frozen base from its model directory when it
resumes, on any layout: pptk.checkpoints.lora_checkpoint.

A save writes into ``step200.partial`` and is renamed to ``step200`` by rank 0 only after a collective that every
rank reaches once all its files are written; ``latest`` is updated after that. A rank killed mid-save therefore
leaves the previous checkpoint and ``latest`` untouched; a write that fails (a full disk) removes the partial tag
and stops every rank in step (pptk.checkpoints.safe_writes). A resume first checks every file against the manifest.

On the same layout, resume uses DeepSpeed's own loader (bitwise exact). On another layout (pp, tp or dp changed),
weights load layer by layer and the optimizer state is rebuilt from the per-layer files, fragment by fragment, into
whatever ZeRO partitions the new layout has; that path is exact too, and also serves the same layout where
DeepSpeed's loader cannot restore the optimizer (bf16 without ZeRO).
Every DeepSpeed internal this needs is in pptk.deepspeed_compat.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pptk import deepspeed_compat as compat
from pptk.checkpoints.integrity import MANIFEST, FileLedger, check_files
from pptk.checkpoints.layer_files import (
    layer_file,
    load_rank_layer,
    optim_file,
    rank_optimizer_states,
    saved_tp,
    tensor_parallel_entry,
)
from pptk.checkpoints.lora_checkpoint import load_lora_state, lora_manifest_entries, save_lora_layers
from pptk.checkpoints.safe_writes import from_every_rank, publish, stop_if_a_write_failed
from pptk.deepspeed_compat import ADAM_STATES
from pptk.errors import PptkError, StoppedByPeer
from pptk.failpoints import failpoint, failpoint_armed
from pptk.parallel.layout import Layout
from pptk.parallel.lora import LoraSettings
from pptk.parallel.pipeline import PipelinePlan, local_layers

FORMAT = 1  # "files" (sizes and checksums, pptk.checkpoints.integrity) is optional: older checkpoints lack it


def describe_layers(plan: PipelinePlan) -> list[dict]:
    return [
        {
            "index": i,
            "class": layer.class_name,
            "role": layer.role,
            "hf_prefix": layer.hf_prefix,
            "tied_key": layer.tied_key,
        }
        for i, layer in enumerate(plan.layers)
    ]


def manifest_for(
    plan: PipelinePlan, *, step: int, layout: Layout | None, tp: int = 1, extra: dict | None = None
) -> dict:
    """``tp`` > 1: the layer files hold one tp rank's slices each, and the manifest says how they were split."""
    return {
        "format": FORMAT,
        "model_type": plan.config.model_type,
        "task": plan.task,
        "hf_config": plan.config.to_dict(),
        "layers": describe_layers(plan),
        "boundaries": list(plan.stages.boundaries),
        "layout": None
        if layout is None
        else {
            "pp": layout.pp,
            "tp": layout.tp,
            "dp": layout.dp,
            "zero_stage": layout.zero_stage,
            "micro_batch_size": layout.micro_batch_size,
            "grad_accum_steps": layout.grad_accum_steps,
            "schedule": layout.schedule,
        },
        "tensor_parallel": tensor_parallel_entry(
            plan.layers, tp, vocab_size=None if plan.vocab is None else plan.vocab.vocab_size
        )
        if tp > 1
        else None,
        "step": step,
        "complete": True,
        **(extra or {}),
    }


def read_manifest(tag_dir: Path) -> dict:
    path = tag_dir / MANIFEST
    if not path.is_file():
        raise PptkError(
            f"{tag_dir} has no {MANIFEST}: it is not a complete pptk checkpoint (a save that did not "
            "finish, or a plain DeepSpeed checkpoint); resume from an earlier tag"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise PptkError(f"{path} has format {manifest.get('format')}, this pptk reads format {FORMAT}")
    return manifest


def find_checkpoint(path: str | Path) -> Path:
    """A tag directory (``.../step200``) or a checkpoints directory, read through its ``latest`` marker."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        tag_dir = path / latest.read_text().strip()
        read_manifest(tag_dir)
        return tag_dir
    if not path.exists():
        raise PptkError(f"checkpoint {path} does not exist")
    raise PptkError(
        f"{path} is neither a pptk checkpoint tag (no {MANIFEST}) nor a checkpoints directory (no "
        "'latest'); pass e.g. runs/x/checkpoints or runs/x/checkpoints/step200"
    )


def check_layer_files(tag_dir: Path) -> None:
    """Before any rank loads them (the trainer calls this on every rank): every file of the checkpoint has the size
    and sha256 recorded when it was saved (older checkpoints: every file is a whole torch archive), so a damaged
    file is one error naming it and the tag, not a stream error midway or, worse, a silent resume from it. The ranks
    of a launch split the hashing (RANK of WORLD_SIZE), so the checkpoint is read once, not once per rank."""
    share = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    check_files(tag_dir, read_manifest(tag_dir), share=share)


def rng_states() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _local_layer_modules(engine, plan: PipelinePlan):
    """(layer index, module) for every layer file this stage writes: its own layers and the first copy of a tie."""
    for index, layer_module in local_layers(engine.module, plan.layers):
        # a tied copy whose first layer sits on another rank is that rank's to write (DualPipeV: two stages a rank)
        if plan.stages.rank_of(index) == engine.stage_id:
            yield index, layer_module


def _save_layer_optimizer_states(engine, plan: PipelinePlan, files: FileLedger) -> None:
    """Per-layer fp32 weights and Adam moments, each tp rank its own slices; collective over the dp group (every
    replica takes part), written by replica 0."""
    _, tp_rank, tp = compat.tensor_parallel_group(engine.module)
    write = engine.grid.get_data_parallel_rank() == 0
    for index, layer_module in _local_layer_modules(engine, plan):
        states = {
            name: {key: compat.get_param_state(engine.optimizer, p, key) for key in ("fp32", *ADAM_STATES)}
            for name, p in layer_module.named_parameters()
        }
        if write:
            files.save(states, optim_file(files.tag_dir, index, tp_rank if tp > 1 else None))


def _save_layer_slices(engine, plan: PipelinePlan, files: FileLedger) -> None:
    """tp > 1: each tp rank of replica 0 writes its own slices of its layers (DeepSpeed's ``-model_YY`` files); no
    layer is ever gathered to full size. pptk.checkpoints.layer_files merges them for another tp and for an export."""
    _, tp_rank, _ = compat.tensor_parallel_group(engine.module)
    if engine.grid.get_data_parallel_rank() != 0:
        return
    for index, layer_module in _local_layer_modules(engine, plan):
        files.save(layer_module.state_dict(), layer_file(files.tag_dir, index, tp_rank))


def _refuse_non_finite(module: torch.nn.Module, *, checkpoints_dir: Path, step: int) -> None:
    """Never save non-finite weights (collective): rank 0 names the ranks holding NaN/inf, the others stop."""
    finite = all(bool(torch.isfinite(p).all()) for p in module.parameters())
    # objects, not CPU tensors: an NCCL process group (GPUs) has no backend for a CPU tensor
    bad_ranks = [rank for rank, ok in enumerate(from_every_rank(finite)) if not ok]
    if not bad_ranks:
        return
    if dist.get_rank() != 0:
        raise StoppedByPeer(code=2)
    latest = checkpoints_dir / "latest"
    kept = f"latest ({latest.read_text().strip()}) is the last good checkpoint" if latest.exists() else "none saved"
    raise PptkError(
        f"the weights at step {step} are not finite (NaN or inf) on rank(s) {bad_ranks}: not saved; {kept}. Resume "
        "from it with a lower --lr or more warmup (a loss that stays finite while weights overflow: check fp16 "
        "loss scaling or gradient clipping)"
    )


def save_checkpoint(
    engine,
    plan: PipelinePlan,
    *,
    layout: Layout,
    checkpoints_dir: Path,
    step: int,
    extra: dict | None = None,
    lora: LoraSettings | None = None,
) -> Path:
    """Save collectively (every rank calls this); returns the final tag directory. ``lora``: the run trains LoRA
    adapters, and only they (and their optimizer state) are saved, with the settings and the base in the manifest.

    Every file is written through a FileLedger (DeepSpeed's too), which records its size and sha256 for the
    manifest, or the write that failed: a full disk, a quota or a file size limit, which torch.save reports as a
    RuntimeError. A failure stops every rank after the writes, in step, with the partial tag removed and ``latest``
    on the last whole checkpoint (pptk.checkpoints.safe_writes).
    """
    compat.check_per_layer_states_supported(engine.optimizer)
    if failpoint_armed("nan", step=step):
        with torch.no_grad():
            next(engine.module.parameters()).view(-1)[0] = float("nan")
    _refuse_non_finite(engine.module, checkpoints_dir=checkpoints_dir, step=step)
    tag = f"step{step}"
    partial, final = checkpoints_dir / f"{tag}.partial", checkpoints_dir / tag
    rank = dist.get_rank()
    files = FileLedger(partial)
    params = sum(cost.unique_params for cost in plan.stages.costs)  # to say how much space a checkpoint needs
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by an earlier save that was killed
        files.write(partial, lambda: partial.mkdir(parents=True))
    stop_if_a_write_failed(files, tag=tag, checkpoints_dir=checkpoints_dir, params=params)
    if lora is not None:  # the trained tensors alone; the frozen base stays where the run read it
        save_lora_layers(engine, _local_layer_modules(engine, plan), files)
    else:
        if layout.tp > 1:  # no DeepSpeed engine files: resume goes through the per-layer files, on any layout
            _save_layer_slices(engine, plan, files)
        else:
            with compat.checkpoint_writes_through(engine, files.write):
                engine.save_checkpoint(str(checkpoints_dir), tag=partial.name, save_latest=False)
        _save_layer_optimizer_states(engine, plan, files)
    files.save(rng_states(), partial / f"rng_rank{rank}.pt")
    failpoint("save", step=step)
    written = stop_if_a_write_failed(files, tag=tag, checkpoints_dir=checkpoints_dir, params=params)
    problem = None
    if rank == 0:
        scheduler = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
        manifest = manifest_for(
            plan,
            step=step,
            layout=layout,
            tp=layout.tp,
            extra={
                "lr_scheduler": scheduler,
                "optimizer_steps": compat.optimizer_step_count(engine.optimizer),
                "param_group_lrs": [g["lr"] for g in compat.base_optimizer(engine.optimizer).param_groups],
                "global_samples": compat.training_progress(engine)[1],
                "loss_scale": compat.loss_scale_state(engine.optimizer),
                "optimizer_wrapper": compat.optimizer_wrapper(engine.optimizer),
                **(lora_manifest_entries(lora, plan) if lora is not None else {}),
                **(extra or {}),
                "files": dict(sorted(written.items())),
            },
        )
        try:
            publish(partial, final, manifest)
        except PptkError as err:
            problem = err
    if from_every_rank(problem is not None)[0]:  # rank 0's outcome, for every rank
        if problem is not None:
            raise problem
        raise StoppedByPeer(code=2)
    return final


def check_compatible(manifest: dict, plan: PipelinePlan) -> None:
    problems = []
    if manifest["model_type"] != plan.config.model_type:
        problems.append(f"model type {manifest['model_type']!r} vs {plan.config.model_type!r}")
    if manifest["task"] != plan.task:
        problems.append(f"task {manifest['task']!r} vs {plan.task!r}")
    theirs = [(entry["class"], entry["hf_prefix"]) for entry in manifest["layers"]]
    ours = [(layer.class_name, layer.hf_prefix) for layer in plan.layers]
    if theirs != ours:
        problems.append(f"{len(theirs)} layers vs {len(ours)} (the model's size or head differs)")
    if problems:
        raise PptkError(
            "the checkpoint does not match this model: "
            + "; ".join(problems)
            + " -- resume with the model and task it was saved from"
        )


def same_layout(manifest: dict, plan: PipelinePlan, layout: Layout) -> bool:
    """Check that this run can continue the checkpoint; True when DeepSpeed's own loader applies (same layout)."""
    check_compatible(manifest, plan)
    saved = manifest["layout"]
    if saved is None:  # converted from Hugging Face: weights only
        return False
    saved_batch = saved["micro_batch_size"] * saved["grad_accum_steps"] * saved["dp"]
    if saved_batch != layout.global_batch_size:
        raise PptkError(
            f"the checkpoint was trained with a global batch of {saved_batch}, this run uses "
            f"{layout.global_batch_size}; keep the global batch (micro x accum x dp) to continue the run, "
            f"e.g. --global-batch-size {saved_batch}"
        )
    return (
        saved["pp"] == layout.pp
        and saved.get("tp", 1) == layout.tp
        and saved.get("schedule", "1f1b") == layout.schedule
        and saved["dp"] == layout.dp
        and saved["zero_stage"] == layout.zero_stage
        and manifest["boundaries"] == list(plan.stages.boundaries)
    )


def resume(engine, plan: PipelinePlan, *, layout: Layout, path: str | Path) -> dict:
    """Restore weights, optimizer, scheduler and RNG; returns the manifest (its "step" is where training resumes)."""
    compat.check_per_layer_states_supported(engine.optimizer)
    tag_dir = find_checkpoint(path)
    manifest = read_manifest(tag_dir)
    same = same_layout(manifest, plan, layout)
    # tp > 1 saves per-layer files only (DeepSpeed's loader would merge them by Megatron's names, not Hugging Face's);
    # LoRA saves no DeepSpeed files at all
    lora = manifest.get("lora") is not None
    if same and not lora and layout.tp == 1 and compat.deepspeed_loader_restores_optimizer(engine):
        loaded, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        if loaded is None:
            raise PptkError(f"DeepSpeed could not load {tag_dir}; the checkpoint is incomplete")
    else:
        _load_per_layer(engine, plan, tag_dir, manifest, lora=lora)
    rng = tag_dir / f"rng_rank{dist.get_rank()}.pt"
    if same and rng.is_file():
        set_rng_states(torch.load(rng, weights_only=False))
    return manifest


def _load_per_layer(engine, plan: PipelinePlan, tag_dir: Path, manifest: dict, *, lora: bool = False) -> None:
    """Any layout: weights from the layer files, fp32 masters and Adam moments from the per-layer optimizer files.
    ``lora``: the trained tensors and their states from the LoRA files (the base came from its model directory)."""
    if lora:
        load_lora_state(engine, plan, tag_dir)
        optimizer_states = True
    else:
        optimizer_states = _load_full_layers(engine, plan, tag_dir, manifest)
    if optimizer_states:
        compat.set_optimizer_step_count(engine.optimizer, manifest.get("optimizer_steps", 0))
        compat.set_loss_scale_state(engine.optimizer, manifest.get("loss_scale"))
    if manifest.get("lr_scheduler") and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(manifest["lr_scheduler"])
    # A scheduler sets the groups' lr when it steps, not when it loads: restore the lr the next step must use.
    for group, lr in zip(compat.base_optimizer(engine.optimizer).param_groups, manifest.get("param_group_lrs", [])):
        group["lr"] = lr
    compat.set_global_steps(engine, manifest["step"], manifest.get("global_samples", 0))


def _load_full_layers(engine, plan: PipelinePlan, tag_dir: Path, manifest: dict) -> bool:
    """Every weight from the layer files, then the optimizer states if saved; returns whether they were."""
    _, tp_rank, tp = compat.tensor_parallel_group(engine.module)
    if tp == 1 and saved_tp(manifest) == 1:
        compat.load_layer_files(engine, tag_dir)  # any pp: one file per layer; tied copies re-synced
    else:  # each rank its own slice files at the same tp; merged and re-cut at another
        for index, layer_module in local_layers(engine.module, plan.layers):
            load_rank_layer(layer_module, tag_dir, manifest, index, tp_rank=tp_rank, tp=tp)
    compat.refresh_master_weights(engine.optimizer)  # fp32 masters from the loaded weights (exact for fp32 checkpoints)
    first_optim = optim_file(tag_dir, 0, 0 if saved_tp(manifest) > 1 else None)
    if manifest.get("layout") is None or not first_optim.is_file():
        return False
    compat.materialise_optimizer_states(engine.optimizer)
    for index, layer_module in local_layers(engine.module, plan.layers):
        states = rank_optimizer_states(layer_module, tag_dir, manifest, index, tp_rank=tp_rank, tp=tp)
        params = dict(layer_module.named_parameters())
        for name, per_key in states.items():
            for key, value in per_key.items():
                # "fp32" restores the exact master weight where the layer file holds only its bf16/fp16 copy
                compat.set_param_state(engine.optimizer, params[name], key, value)
    return True
