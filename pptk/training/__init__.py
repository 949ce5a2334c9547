# The one training loop and what it needs: the typed run config, the DeepSpeed config and engine, guards,
# observation, reporting and the run directory.
"""Modules:

- ``config``: ``RunConfig``, what a recipe asks for, frozen and saved with every checkpoint;
- ``task_hooks``: the protocol between the trainer and a task (``PreparedTask``, ``Batch``, ``Evaluation``);
- ``ds_config``: DeepSpeed JSON, ``"auto"`` values filled from the run, bad combinations refused early;
- ``engine``: from a ``RunConfig`` to a running DeepSpeed pipeline engine;
- ``trainer``: ``Trainer(run, prepare).fit()``, all a recipe calls; ``saving``: a step's save, and judging the
  weights before it;
- ``token_mean``: the loss as the mean over every counted token of the step (SFT, masked-LM), not of micro-batches;
- ``guards``, ``observe``, ``reporting``, ``run_dir``: divergence, measured efficiency, metrics and summary, and the
  output directory's ownership.

May import: checkpoints, parallel, models, launch, data, deepspeed_compat, errors, logs, failpoints.
"""
