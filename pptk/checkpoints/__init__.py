# What pptk writes and reads back: training checkpoints, their layer files, and conversion to and from Hugging Face.
"""Modules:

- ``training``: safe saves (``latest`` moves last), the manifest, exact resume and resume on another layout;
- ``layer_files``: where each layer's weights and optimizer state live at any tp, and reading them at another;
- ``convert``: Hugging Face directory <-> pipeline checkpoint, one layer in memory at a time.

May import: parallel, models, launch, data, deepspeed_compat, errors, logs, failpoints.
"""
