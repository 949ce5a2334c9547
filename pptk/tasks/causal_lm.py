# Causal-LM pretraining: text files (or the embedded demo) packed into blocks; loss and perplexity; a greedy sample.
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pptk.config import RunConfig
from pptk.data.demo import demo_corpus, demo_documents, train_demo_tokenizer
from pptk.data.lm import LMBlocks, check_token_ids, split_train_eval, tokenize_files, tokenize_texts
from pptk.data.sampler import Shard, micro_batches_per_epoch, train_indices
from pptk.errors import PptkError
from pptk.models import get_adapter
from pptk.pipeline import ModelSource, PipelinePlan, max_positions, resolve_model
from pptk.tasks.base import Batch, Evaluation, replica_mean

TASK = "causal-lm"
# The embedded default (`--demo`): a small GPT-2 and a byte-level BPE trained on the standard library's docstrings.
DEMO_MODEL = dict(vocab_size=4096, n_embd=128, n_layer=4, n_head=4)
DEMO_SEQ_LEN = 64


@dataclass(frozen=True, kw_only=True)
class CausalLMData:
    files: tuple[Path, ...] = ()
    seq_len: int | None = None  # default: the model's positions
    eval_fraction: float = 0.05
    demo: bool = False  # the embedded corpus and tokenizer; the model is DEMO_MODEL, or a family's small config


def demo_config(vocab_size: int, model_type: str | None):
    """The demo's model: a ~3.5M-parameter GPT-2, or the small config of another family (--demo --model llama)."""
    from transformers import GPT2Config

    if model_type in (None, "gpt2"):
        return GPT2Config(
            n_positions=DEMO_SEQ_LEN, bos_token_id=0, eos_token_id=0, **{**DEMO_MODEL, "vocab_size": vocab_size}
        )
    config = get_adapter(model_type).small_config()
    config.vocab_size = vocab_size
    config.max_position_embeddings = max(DEMO_SEQ_LEN, getattr(config, "max_position_embeddings", 0) or 0)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, name, None) is not None:
            setattr(config, name, 0)
    return config


def _model_and_tokens(run: RunConfig) -> tuple[ModelSource, Any, np.ndarray]:
    from transformers import AutoTokenizer

    data: CausalLMData = run.data
    if data.demo:
        if run.model.model is not None:
            get_adapter(run.model.model)  # --demo --model llama: the embedded default with another family
        # Every rank trains the same tokenizer (deterministic, a second or two) and renames it into place atomically.
        tokenizer_dir = train_demo_tokenizer(
            text=demo_corpus(), vocab_size=DEMO_MODEL["vocab_size"], out_dir=run.output.output_dir / "tokenizer"
        )
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        config = demo_config(len(tokenizer), run.model.model)
        return (
            ModelSource(config, None, f"demo {config.model_type}"),
            tokenizer,
            tokenize_texts(demo_documents(), tokenizer),
        )
    if run.model.model is None or not data.files:
        raise PptkError("give --model and --data (or --demo for the embedded default)")
    missing = [str(p) for p in data.files if not Path(p).is_file()]
    if missing:
        raise PptkError(f"--data file(s) not found: {', '.join(missing)}; check the paths")
    source = resolve_model(run.model.model)
    tokenizer_dir = run.model.tokenizer or source.pretrained_dir or Path(run.model.model).parent
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return source, tokenizer, tokenize_files(data.files, tokenizer)


def prepare(run: RunConfig) -> PreparedCausalLM:
    source, tokenizer, tokens = _model_and_tokens(run)
    positions = max_positions(source.config)
    seq_len = run.data.seq_len or (DEMO_SEQ_LEN if run.data.demo else positions)
    if seq_len is None:
        raise PptkError(f"{source.label} declares no max_position_embeddings; pass --seq-len")
    if positions is not None and seq_len > positions:
        raise PptkError(
            f"--seq-len {seq_len} is longer than the model's {positions} positions; use --seq-len {positions} or less"
        )
    check_token_ids(tokens, vocab_size=source.config.vocab_size)
    blocks = LMBlocks.from_tokens(tokens, block_size=seq_len)
    train, evaluation = split_train_eval(blocks, eval_fraction=run.data.eval_fraction, seed=run.seed)
    return PreparedCausalLM(
        source=source,
        tokenizer=tokenizer,
        seq_len=seq_len,
        train=train,
        eval=evaluation,
        sample_prompt=run.output.sample_prompt,
    )


@dataclass
class PreparedCausalLM:
    source: ModelSource
    tokenizer: Any
    seq_len: int
    train: LMBlocks
    eval: LMBlocks
    sample_prompt: str | None = None
    task: str = TASK
    dynamic_shape: bool = False
    _extra: dict = field(default_factory=dict)

    @property
    def num_train_examples(self) -> int:
        return len(self.train)

    def describe(self) -> str:
        return f"{len(self.train)} train / {len(self.eval)} eval blocks of {self.seq_len} tokens"

    def tokens_per_example(self) -> float:
        return float(self.seq_len)

    def loss_fn(self, plan: PipelinePlan):
        return plan.loss_fn()

    def train_batch(self, indices: np.ndarray, number: int, shard: Shard) -> Batch:
        return _lm_batch(self.train, indices)

    def evaluate(self, engine, shard: Shard, *, max_micro_batches: int) -> Evaluation | None:
        if len(self.eval) < shard.examples_per_micro_batch:
            return None
        # never more micro-batches than each replica's share of the eval blocks; the same blocks every time
        count = min(max_micro_batches, micro_batches_per_epoch(len(self.eval), shard))
        indices = train_indices(len(self.eval), shard, seed=0)
        batches = [_lm_batch(self.eval, next(indices)) for _ in range(count)]
        loss = replica_mean(float(engine.eval_batch(iter(batches), num_micro_batches=count)))
        return Evaluation({"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0)))})

    def summary_extra(self) -> dict[str, Any]:
        return dict(self._extra)

    def after_export(self, export_dir: Path) -> dict[str, Any]:
        if self.sample_prompt is None:
            return {}
        sample = greedy_sample(export_dir, self.sample_prompt)
        self._extra["sample"] = sample
        return {"sample": sample}


def _lm_batch(blocks: LMBlocks, indices: np.ndarray) -> Batch:
    # labels are the inputs: Hugging Face's causal-LM loss shifts them; packed blocks have no padding
    input_ids = blocks[torch.from_numpy(np.asarray(indices))]
    return (input_ids, torch.ones_like(input_ids)), input_ids.clone()


def greedy_sample(model_dir: Path, prompt: str, *, new_tokens: int = 40) -> str:
    """The exported model, loaded by transformers alone, continuing ``prompt`` greedily."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf_logging.disable_progress_bar()  # a "Loading weights" bar would land between the summary's lines
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    finally:
        hf_logging.enable_progress_bar()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    room = (getattr(model.config, "max_position_embeddings", None) or 1 << 30) - ids.shape[1]
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max(0, min(new_tokens, room)),
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id or 0,
        )
    return tokenizer.decode(out[0], skip_special_tokens=True)
