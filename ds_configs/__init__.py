# The DeepSpeed configs pptk ships: JSON files read through importlib.resources (pptk.ds_config.shipped_config).
