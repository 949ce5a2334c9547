# The entry point: a Hugging Face model (dir, config.json, config or type name) -> DeepSpeed PipelineModule.
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from deepspeed.pipe import DualPipeVModule, PipelineModule, TiedLayerSpec
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from pptk.deepspeed_compat import build_each_layer_with, partition_by_boundaries, tensor_parallel_group
from pptk.errors import PptkError
from pptk.models import PipeLayer, first_tied_index, get_family, layers_for, supported_model_types
from pptk.models.common import init_layer_like_hf
from pptk.models.heads import get_task, hf_model_class, infer_task
from pptk.models.moe import experts_of
from pptk.parallel.hf_weights import HFCheckpoint, hf_conversions, load_stage_weights
from pptk.parallel.partition import StagePlan, layer_costs, plan_stages
from pptk.parallel.recompute import check_one_checkpointing, check_recompute_attention, recompute_attention
from pptk.parallel.schedules import check_schedule, stages_for
from pptk.parallel.sequence_parallel import SequenceGroup, apply_sequence_parallel, sequence_parallel_problem
from pptk.parallel.tensor_parallel import (
    check_tensor_parallel,
    materialize_parameters,
    shard_stage,
    sum_partial_gradients,
)
from pptk.parallel.vocab_parallel import VocabSplit, is_vocab_layer, shard_vocab, vocab_split_for


@dataclass(frozen=True)
class ModelSource:
    """What the user pointed at: a config, and the directory its weights live in (None: random init)."""

    config: PretrainedConfig
    pretrained_dir: Path | None
    label: str


def resolve_model(model: str | Path | PretrainedConfig) -> ModelSource:
    """A local Hugging Face dir, a config.json, a config object, or a model type (a small random config).

    pptk never downloads: hub names are refused with the command that fetches them.
    """
    if isinstance(model, PretrainedConfig):
        return ModelSource(model, None, f"{model.model_type} (config)")
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PptkError(f"{path} has no config.json; point to a Hugging Face model directory")
        config = AutoConfig.from_pretrained(path)
        has_weights = any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))
        if not has_weights:
            _refuse_unreadable_weights(path)
        return ModelSource(config, path if has_weights else None, str(path))
    if path.suffix == ".json":
        if not path.is_file():
            raise PptkError(f"config file {path} does not exist")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise PptkError(f"{path} is not valid JSON: {err}") from None
        if "model_type" not in raw:
            raise PptkError(f'{path} has no "model_type"; it is not a Hugging Face config.json')
        get_family(raw["model_type"])
        config = AutoConfig.for_model(**raw)
        return ModelSource(config, None, str(path))
    name = str(model)
    if name in supported_model_types():
        return ModelSource(get_family(name).small_config(), None, f"{name} (small random config)")
    raise PptkError(
        f"{name!r} is not a local model directory, a config.json, or a supported model type "
        f"({', '.join(supported_model_types())}). pptk reads only local files: fetch hub models first, e.g. "
        f"`huggingface-cli download {name} --local-dir models/{name.rsplit('/', maxsplit=1)[-1]}`"
    )


def _refuse_unreadable_weights(path: Path) -> None:
    """A directory with weights pptk cannot read must not train (or verify) from random ones."""
    legacy = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack"))
    stray = sorted(p.name for p in path.glob("*.safetensors"))
    if legacy or stray:
        found = ", ".join((legacy + stray)[:4])
        fix = (
            're-save it as safetensors: `python -c "from transformers import AutoModel; '
            f"AutoModel.from_pretrained('{path}').save_pretrained('{path}')\"` (use the task's AutoModelFor* class)"
            if legacy
            else "name it model.safetensors, or write a model.safetensors.index.json for shards"
        )
        raise PptkError(f"{path} holds weights pptk cannot read ({found}); {fix}")


def prepare_config(
    config: PretrainedConfig, *, attn_implementation: str = "sdpa", dropout: bool = True
) -> PretrainedConfig:
    """A copy of the config with the attention kernel chosen and, for exact comparisons, dropout switched off."""
    config = copy.deepcopy(config)
    config._attn_implementation = attn_implementation
    if not dropout:
        for name, value in list(config.to_dict().items()):
            if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
                setattr(config, name, 0.0)
    return config


def max_positions(config: PretrainedConfig) -> int | None:
    return getattr(config, "max_position_embeddings", None)


@dataclass(frozen=True)
class PipelinePlan:
    """Everything decided before any process starts: config, layers, which stage holds which layer."""

    source: ModelSource
    config: PretrainedConfig
    task: str
    layers: list[PipeLayer]
    stages: StagePlan
    vocab: VocabSplit | None = None  # tp > 1: the embedding and LM head split by vocabulary rows
    sequence_parallel: bool = False  # tp > 1: the regions outside attention and MLP hold S / tp positions
    recompute_attention: bool = False  # selective checkpointing: each block's attention recomputed in backward

    @property
    def hf_class(self) -> type[Any]:
        return hf_model_class(self.config, self.task)

    def loss_fn(self):
        task = get_task(self.task)
        return task.loss(self.config) if self.vocab is None else task.loss(self.config, vocab=self.vocab)


def plan_pipeline(
    model: str | Path | PretrainedConfig | ModelSource,
    *,
    num_stages: int,
    task: str | None = None,
    partition_method: str = "compute",
    attn_implementation: str = "sdpa",
    dropout: bool = True,
    seq_len: int | None = None,
    schedule: str = "1f1b",
    micro_batch_size: int = 1,
    measured_ms: tuple[float, ...] | None = None,
    tp: int = 1,
    vocab_parallel: bool | None = None,
    sequence_parallel: bool = False,
    recompute_attention: bool = False,
) -> PipelinePlan:
    """task: None reads it from config.architectures (see pptk.models.heads.infer_task); a name overrides that.

    num_stages: pipeline ranks (pp); under ``schedule="dualpipev"`` the model is cut into 2 x pp stages.
    tp: tensor-parallel shards per stage; checked here (family, heads) so a bad value fails before ranks start.
    vocab_parallel: at tp > 1, split the embedding, LM head and loss by vocabulary (pptk.parallel.vocab_parallel);
    None: wherever the model and task can, True: refuse where they cannot, False: keep them replicated.
    sequence_parallel: Megatron's sequence parallelism (pptk.parallel.sequence_parallel); refused where the family,
    tp or the vocabulary split do not allow it.
    recompute_attention: selective activation checkpointing (pptk.parallel.recompute).
    partition_method "profile" times every layer on one micro-batch of ``micro_batch_size x seq_len`` here,
    unless ``measured_ms`` (one time per layer, e.g. another rank's) is given.
    """
    check_schedule(schedule, pp=num_stages, tp=tp)
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    config = prepare_config(source.config, attn_implementation=attn_implementation, dropout=dropout)
    task = infer_task(config, task, source=source.label)
    layers = layers_for(config, task)
    check_tensor_parallel(config, tp)
    positions = max_positions(config) or 2048
    length = min(seq_len or positions, positions)
    costs = layer_costs(layers, hidden_size=config.hidden_size, seq_len=length, experts=experts_of(config))
    if partition_method == "profile" and measured_ms is None:
        from pptk.parallel.profile import profile_layers

        measured_ms = profile_layers(
            layers,
            input_names=get_family(config.model_type).input_names,
            vocab_size=config.vocab_size,
            micro_batch_size=micro_batch_size,
            seq_len=length,
        )
    stages = plan_stages(
        costs,
        num_stages=stages_for(schedule, num_stages),
        method=partition_method,
        schedule=schedule,
        measured_ms=measured_ms if partition_method == "profile" else None,
    )
    vocab = vocab_split_for(config, task, layers, tp, wanted=vocab_parallel)
    if sequence_parallel and (
        problem := sequence_parallel_problem(config.model_type, tp=tp, vocab_split=vocab is not None, task=task)
    ):
        raise PptkError(f"--sequence-parallel: {problem}; drop --sequence-parallel")
    if recompute_attention:
        check_recompute_attention(layers)
    return PipelinePlan(
        source,
        config,
        task,
        layers,
        stages,
        vocab=vocab,
        sequence_parallel=sequence_parallel,
        recompute_attention=recompute_attention,
    )


class PlannedPipelineModule(PipelineModule):
    """DeepSpeed's PipelineModule, partitioned by pptk's plan (see pptk.parallel.partition) rather than its own.

    make_layer(module, index, spec): builds and finishes each local layer, one at a time (see _make_layer).
    """

    def __init__(self, layers, *, boundaries: tuple[int, ...], make_layer: Callable | None = None, **kwargs):
        # _partition_layers and _build run inside PipelineModule.__init__, so the plan must be in place before it.
        object.__setattr__(self, "_pptk_boundaries", list(boundaries))
        object.__setattr__(self, "_pptk_make_layer", make_layer)
        super().__init__(layers, **kwargs)

    def _partition_layers(self, method: str = "uniform") -> None:
        partition_by_boundaries(self, self._pptk_boundaries)  # DeepSpeed's private hook: see deepspeed_compat

    def _build(self) -> None:
        if self._pptk_make_layer is None:
            super()._build()
        else:
            build_each_layer_with(self, super()._build, partial(self._pptk_make_layer, self))


class PlannedDualPipeVModule(DualPipeVModule, PlannedPipelineModule):
    """DeepSpeed's DualPipeVModule on pptk's 2 x pp stage plan: DualPipeVModule doubles num_stages and derives the
    mirror stage's bounds; the cut itself comes from PlannedPipelineModule (next in the method order)."""


class SequentialPipe(nn.Module):
    """The same layers in one process, tied modules shared: a PipelineModule without DeepSpeed or process groups.

    State-dict keys are the PipelineModule's ("{index}.{name}", "tied_modules.{key}.{name}"), so weights move
    between the two unchanged. Used for single-process parity checks and pp=1 comparisons.
    """

    def __init__(self, layers: list[PipeLayer]):
        super().__init__()
        self.tied_modules = nn.ModuleDict()
        self.forward_funcs = []
        for index, layer in enumerate(layers):
            spec = layer.spec
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in self.tied_modules:
                    self.tied_modules[spec.key] = spec.build()
                module = self.tied_modules[spec.key]
                self.forward_funcs.append(partial(spec.forward_fn, module) if spec.forward_fn else module)
            else:
                module = spec.build()
                self.add_module(str(index), module)
                self.forward_funcs.append(module)

    def forward(self, inputs):
        for func in self.forward_funcs:
            inputs = func(inputs)
        return inputs


def local_layers(module: PipelineModule, layers: list[PipeLayer]):
    """(index, module) for every layer this process holds; a tied module goes by the index of its first layer."""
    first = first_tied_index(layers)
    for key, tied in module.tied_modules.items():
        yield first[key], tied
    for name, child in module.named_children():
        if name.isdigit():
            yield int(name), child


def initialise_weights(module: nn.Module, plan: PipelinePlan, *, seed: int = 1234) -> None:
    """Hugging Face's initialisation for every local layer, then the pretrained tensors of this stage, if any."""
    for index, layer_module in local_layers(module, plan.layers):
        init_layer_like_hf(layer_module, config=plan.config, hf_class=plan.hf_class, seed=seed + index)
    load_pretrained(module, plan)


def load_pretrained(module: nn.Module, plan: PipelinePlan) -> None:
    """Copy this stage's tensors (each tp rank its slices) from the model's checkpoint, if it has one."""
    if plan.source.pretrained_dir is not None:
        optional = tuple(layer.hf_prefix for layer in plan.layers if layer.optional)
        load_stage_weights(
            module,
            plan.layers,
            HFCheckpoint(plan.source.pretrained_dir, conversions=hf_conversions(plan.hf_class, plan.config)),
            base_model_prefix=plan.hf_class.base_model_prefix,
            allow_missing=optional,
        )


def build_pipeline_module(
    plan: PipelinePlan,
    *,
    topology=None,
    activation_checkpoint_interval: int = 0,
    dynamic_shape: bool = False,
    seed: int = 1234,
    loss_fn: Callable | None = None,
) -> PlannedPipelineModule:
    """Build this rank's stage (only its own layers, each initialised and sharded as it is built), then load it.
    Needs torch.distributed to be initialised.

    loss_fn: what the last stage computes from (logits, labels); default the task's Hugging Face loss.
    """
    check_one_checkpointing(selective=plan.recompute_attention, interval=activation_checkpoint_interval)
    specs = [layer.spec for layer in plan.layers]
    kwargs = dict(num_stages=None if topology else plan.stages.num_ranks, topology=topology)
    module_class = PlannedDualPipeVModule if plan.stages.schedule == "dualpipev" else PlannedPipelineModule
    module = module_class(
        specs,
        boundaries=plan.stages.boundaries,
        make_layer=partial(_make_layer, plan=plan, seed=seed, tied_index=first_tied_index(plan.layers)),
        loss_fn=loss_fn or plan.loss_fn(),
        activation_checkpoint_interval=activation_checkpoint_interval,
        # only blocks: the embedding's inputs carry no gradient, which the reentrant checkpoint cannot handle
        checkpointable_layers=sorted({layer.class_name for layer in plan.layers if layer.role == "block"}),
        dynamic_shape=dynamic_shape,
        **kwargs,
    )
    load_pretrained(module, plan)
    return module


def _make_layer(module: PipelineModule, index: int, spec, *, plan: PipelinePlan, seed: int, tied_index) -> nn.Module:
    """One local layer, initialised like Hugging Face and cut to this tp rank's slice.

    A rank thus holds at most its shard plus the layer in hand. With pretrained weights at tp > 1 a block is built
    on the meta device and only its slices are allocated, as the checkpoint overwrites the init anyway; from
    scratch it is initialised whole and then cut, so any tp starts from the same model as tp=1.
    """
    group, rank, size = tensor_parallel_group(module)
    init = partial(
        init_layer_like_hf,
        config=plan.config,
        hf_class=plan.hf_class,
        seed=seed + (tied_index[spec.key] if isinstance(spec, TiedLayerSpec) else index),
    )
    recompute = plan.recompute_attention and plan.layers[index].role == "block"
    if size == 1:
        layer = spec.build()
        init(layer)
        if recompute:
            recompute_attention(layer)
        return layer

    vocab = plan.vocab.bind(group, rank) if plan.vocab is not None and is_vocab_layer(plan.layers[index]) else None
    if plan.source.pretrained_dir is not None and (plan.layers[index].role == "block" or vocab is not None):
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            layer = spec.build()
        _shard_layer(layer, group=group, rank=rank, size=size, vocab=vocab)
        materialize_parameters(layer)
        # what sharding left whole; the sliced parameters come from the checkpoint. An embedding or LM head is its
        # sliced weight alone, and HF's init would zero a row by the full vocabulary's padding index: skipped.
        if vocab is None:
            init(layer)
    else:
        layer = spec.build()
        init(layer)
        _shard_layer(layer, group=group, rank=rank, size=size, vocab=vocab)
    if recompute:
        recompute_attention(layer)
    if plan.sequence_parallel:
        apply_sequence_parallel(layer, role=plan.layers[index].role, sequence=SequenceGroup(group, rank, size))
    sum_partial_gradients(layer, group=group)
    return layer


def _shard_layer(layer: nn.Module, *, group, rank: int, size: int, vocab) -> None:
    shard_stage(layer, group=group, rank=rank, size=size)
    if vocab is not None:
        shard_vocab(layer, vocab)


def build_sequential_module(plan: PipelinePlan, *, seed: int = 1234) -> SequentialPipe:
    module = SequentialPipe(plan.layers)
    initialise_weights(module, plan, seed=seed)
    return module


def pipeline_inputs(plan: PipelinePlan) -> tuple[str, ...]:
    return get_family(plan.config.model_type).input_names


@torch.no_grad()
def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
