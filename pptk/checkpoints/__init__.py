# What pptk writes and reads back: training checkpoints, their layer files, and conversion to and from Hugging Face.
"""Modules:

- ``training``: saves, the manifest, exact resume and resume on another layout;
- ``safe_writes``: ``latest`` moves last; a failed write (a full disk) stops every rank in step, nothing half-saved;
- ``integrity``: each file's size and sha256, recorded as it is written and checked before it is read;
- ``layer_files``: where each layer's weights and optimizer state live at any tp, and reading them at another;
- ``convert``: Hugging Face directory <-> pipeline checkpoint, one layer in memory at a time.

May import: parallel, models, launch, data, deepspeed_compat, errors, logs, failpoints.
"""
