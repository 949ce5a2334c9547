"""pptk: pipeline-parallel training of Hugging Face transformers on DeepSpeed."""

__version__ = "0.1.0"
