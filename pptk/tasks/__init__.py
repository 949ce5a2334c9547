# Training tasks: each prepares its data, batches and evaluation for the trainer (causal-LM, masked-LM, SFT,
# sequence and token classification, reward models).
"""A task module gives the trainer a ``PreparedTask`` (``pptk.training.task_hooks``). What a task computes as its loss
and which Hugging Face Auto class it exports to is model knowledge and lives in ``pptk.models.heads``.

May import: training, checkpoints, parallel, models, launch, data, deepspeed_compat, errors, logs, failpoints.
"""
