# How a model is cut and spread over ranks: the layout, the partition, schedules, tensor parallelism, and
# building each rank's stage of the PipelineModule (with its own tensors of the Hugging Face checkpoint).
"""Modules:

- ``layout``: ``Layout``, pp x tp x dp with micro-batches and ZeRO stage, validated as one frozen dataclass;
- ``partition``, ``profile``: which layers go to which stage (by parameters, by type, or timed);
- ``schedules``: 1f1b and dualpipev and their constraints;
- ``tensor_parallel``: Megatron-style sharding of a stage's blocks over the tp group;
- ``pipeline``: a Hugging Face model (dir, config, type name) -> ``PipelinePlan`` -> this rank's ``PipelineModule``;
- ``hf_weights``: Hugging Face safetensors into a stage, each rank reading only its own tensors and slices;
- ``lora``, ``lora_export``: LoRA adapters injected by peft into a built stage, and their peft-format export.

May import: models, launch, data, deepspeed_compat, errors, logs, failpoints.
"""
