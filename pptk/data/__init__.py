# Training data: the embedded demo, readers, label sets, tokenization, packing and the one sampler.
"""Modules, by what they hold:

- ``demo``: the offline demo corpus (the standard library's docstrings) and its byte-level BPE tokenizer;
- ``lm``: causal-LM documents tokenized with eos between them and packed into fixed-length blocks;
- ``readers``, ``labels``, ``encode``: fine-tuning files (CSV/TSV/JSONL, CoNLL, text lines), label sets, and
  tokenized, right-padded micro-batches;
- ``sampler``: which examples each data-parallel replica sees at each micro-batch (a function of the step).

May import: errors, logs. Nothing else of pptk: data knows no model, layout or DeepSpeed.
"""
