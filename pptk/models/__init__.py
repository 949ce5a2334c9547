# The adapter registry: one entry per Hugging Face model family, keyed by config.model_type.
"""An adapter turns a Hugging Face config into a flat list of pipeline layers (``PipeLayer``).

Each ``PipeLayer`` carries:
- ``spec``: a DeepSpeed ``LayerSpec``/``TiedLayerSpec`` (the layer is built only on the rank that owns it);
- ``role``: "embed" (always on the first stage), "block" (balanced across stages) or "head" (always last);
- ``hf_prefix``: where the layer's parameters live in the Hugging Face task model's state dict, so a parameter
  named ``ln_1.weight`` inside layer 3 is ``hf_prefix + "ln_1.weight"`` = ``transformer.h.2.ln_1.weight``.

Adapter files (``gpt2.py``, ...) register themselves on import; ``get_adapter`` imports every module here.
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
class Adapter:
    model_type: str
    # task name -> builder(config) -> list[PipeLayer]; task names are those of pptk.tasks.TASKS
    tasks: dict[str, Callable[..., list[PipeLayer]]]
    # a small random config of this family, for `pptk verify gpt2` and the tests
    small_config: Callable[[], Any]
    # the pipeline inputs this family reads, in order (see pptk.protocol)
    input_names: tuple[str, ...] = ("input_ids", "attention_mask")
    # config fields that a pipeline cannot honour yet: name -> predicate(value) that is True when unsupported
    unsupported: dict[str, Callable[[object], bool]] = field(default_factory=dict)
    num_blocks: Callable[[Any], int] = lambda config: config.num_hidden_layers


def first_tied_index(layers: list[PipeLayer]) -> dict[str, int]:
    """Tied key -> index of its first layer: where DeepSpeed saves the tied module, and the seed it is built with."""
    first: dict[str, int] = {}
    for index, layer in enumerate(layers):
        if layer.tied_key:
            first.setdefault(layer.tied_key, index)
    return first


_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    if adapter.model_type in _REGISTRY:
        raise RuntimeError(f"adapter for {adapter.model_type!r} registered twice")
    _REGISTRY[adapter.model_type] = adapter
    return adapter


def _load_builtin_adapters() -> None:
    # Every module in this package except the shared layers is an adapter file that registers itself on import.
    for info in pkgutil.iter_modules(__path__):
        if info.name != "common":
            importlib.import_module(f"{__name__}.{info.name}")


def supported_model_types() -> list[str]:
    _load_builtin_adapters()
    return sorted(_REGISTRY)


def get_adapter(model_type: str) -> Adapter:
    _load_builtin_adapters()
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise PptkError(
            f"model type {model_type!r} has no pptk adapter; supported: {', '.join(supported_model_types())}. "
            "Pick a supported family, or add an adapter in pptk/models/ (see README, 'Adding a model family')"
        ) from None


def layers_for(config, task: str) -> list[PipeLayer]:
    """The pipeline layers of ``config`` for ``task``, after checking the config is one pptk can honour."""
    adapter = get_adapter(config.model_type)
    if task not in adapter.tasks:
        raise PptkError(
            f"task {task!r} is not supported for {config.model_type}; supported: {', '.join(sorted(adapter.tasks))}"
        )
    for name, is_unsupported in adapter.unsupported.items():
        value = getattr(config, name, None)
        if is_unsupported(value):
            raise PptkError(
                f"{config.model_type} config sets {name}={value!r}, which pptk's pipeline does not support yet; "
                "change it in config.json or train without the pipeline"
            )
    return adapter.tasks[task](config)
