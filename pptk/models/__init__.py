# The model-family registry: one entry per Hugging Face model family, keyed by config.model_type.
"""A family module turns a Hugging Face config into a flat list of pipeline layers (``PipeLayer``).

Each ``PipeLayer`` carries:
- ``spec``: a DeepSpeed ``LayerSpec``/``TiedLayerSpec`` (the layer is built only on the rank that owns it);
- ``role``: "embed" (always on the first stage), "block" (balanced across stages) or "head" (always last);
- ``hf_prefix``: where the layer's parameters live in the Hugging Face task model's state dict, so a parameter
  named ``ln_1.weight`` inside layer 3 is ``hf_prefix + "ln_1.weight"`` = ``transformer.h.2.ln_1.weight``.

Family modules (``gpt2.py``, ``bert.py``, ``decoder.py``) register themselves on import; ``get_family`` imports every
module here. ``protocol`` names the tensors that cross a stage boundary; ``heads`` maps a task to its Hugging Face
Auto class and loss.

May import: data, deepspeed_compat, launch, errors, logs, failpoints (and DeepSpeed's public ``deepspeed.pipe``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deepspeed.pipe import LayerSpec, TiedLayerSpec

from pptk.errors import PptkError


@dataclass(frozen=True)
class PipeLayer:
    spec: LayerSpec
    role: str  # "embed" | "block" | "head"
    hf_prefix: str
    # a task head that a base checkpoint may lack: then it starts freshly initialised, as in Hugging Face
    optional: bool = False

    @property
    def tied_key(self) -> str | None:
        return self.spec.key if isinstance(self.spec, TiedLayerSpec) else None

    @property
    def class_name(self) -> str:
        return self.spec.typename.__name__


@dataclass(frozen=True)
class ModelFamily:
    model_type: str
    # task name -> builder(config) -> list[PipeLayer]; task names are those of pptk.models.heads.TASKS
    tasks: dict[str, Callable[..., list[PipeLayer]]]
    # a small random config of this family, for `pptk verify gpt2` and the tests
    small_config: Callable[[], Any]
    # the pipeline inputs this family reads, in order (see pptk.models.protocol)
    input_names: tuple[str, ...] = ("input_ids", "attention_mask")
    # config fields that a pipeline cannot honour yet: name -> predicate(value) that is True when unsupported
    unsupported: dict[str, Callable[[object], bool]] = field(default_factory=dict)
    num_blocks: Callable[[Any], int] = lambda config: config.num_hidden_layers
    # the task of a config that names none (no config.architectures): decoders are language models first
    default_task: str | None = None


def first_tied_index(layers: list[PipeLayer]) -> dict[str, int]:
    """Tied key -> index of its first layer: where DeepSpeed saves the tied module, and the seed it is built with."""
    first: dict[str, int] = {}
    for index, layer in enumerate(layers):
        if layer.tied_key:
            first.setdefault(layer.tied_key, index)
    return first


_REGISTRY: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    if family.model_type in _REGISTRY:
        raise RuntimeError(f"family for {family.model_type!r} registered twice")
    _REGISTRY[family.model_type] = family
    return family


def _load_builtin_families() -> None:
    # Every module in this package except the shared layers is a family module that registers itself on import.
    for info in pkgutil.iter_modules(__path__):
        if info.name != "common":
            importlib.import_module(f"{__name__}.{info.name}")


def supported_model_types() -> list[str]:
    _load_builtin_families()
    return sorted(_REGISTRY)


def get_family(model_type: str) -> ModelFamily:
    _load_builtin_families()
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise PptkError(
            f"model type {model_type!r} has no pptk family module; supported: {', '.join(supported_model_types())}. "
            "Pick a supported family, or add a family module in pptk/models/ (see docs/extending.md)"
        ) from None


def layers_for(config, task: str) -> list[PipeLayer]:
    """The pipeline layers of ``config`` for ``task``, after checking the config is one pptk can honour."""
    family = get_family(config.model_type)
    if task not in family.tasks:
        raise PptkError(
            f"task {task!r} is not supported for {config.model_type}; supported: {', '.join(sorted(family.tasks))}"
        )
    for name, is_unsupported in family.unsupported.items():
        value = getattr(config, name, None)
        if is_unsupported(value):
            raise PptkError(
                f"{config.model_type} config sets {name}={value!r}, which pptk's pipeline does not support yet; "
                "change it in config.json or train without the pipeline"
            )
    return family.tasks[task](config)
