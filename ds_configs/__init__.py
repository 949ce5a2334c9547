# The DeepSpeed configs pptk ships: JSON files read through importlib.resources (training.ds_config.shipped_config).
