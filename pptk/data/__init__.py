# Training data: the embedded demo, readers, label sets, tokenization, prepared and Megatron sets, chats, the sampler.
"""Modules, by what they hold:

- ``demo``: the offline demo corpus (the standard library's docstrings) and its byte-level BPE tokenizer;
- ``lm``: causal-LM documents tokenized with eos between them and packed into fixed-length blocks;
- ``readers``, ``labels``, ``encode``: fine-tuning files (CSV/TSV/JSONL, CoNLL, text lines), label sets, and
  tokenized, right-padded micro-batches;
- ``prepare``, ``blocks``, ``corpus``, ``documents``, ``integrity``, ``workers``: prepared token sets (tokenize once,
  memory-map, checksums, blends, document boundaries); ``megatron``: Megatron-LM's indexed datasets (.bin/.idx) read
  and written; ``vocabulary``: sampled checks of a set that records no tokenizer; ``inspection``: `pptk data inspect`;
- ``chat``, ``chat_template``, ``packing``, ``sft``: instruction-tuning data (chat formats, the tokenizer's template,
  answer masks, packed rows); ``demo_chat``: offline chats for the tests and benchmarks;
- ``sampler``: which examples each data-parallel replica sees at each micro-batch (a function of the step).

May import: errors, logs. Nothing else of pptk: data knows no model, layout or DeepSpeed.
"""
