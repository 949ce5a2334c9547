# `pptk verify`: one training step through the real pipeline engine on CPU ranks, compared with Hugging Face.
"""Modules: ``run`` (the job, the ranks' side) and ``compare`` (the Hugging Face reference step and the comparison).

May import: tasks, training, checkpoints, parallel, models, launch, data, deepspeed_compat, errors, logs, failpoints.
"""
