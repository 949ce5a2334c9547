# Causal-LM pretraining: memory-mapped prepared sets (text files and the demo prepared first) cut into blocks.
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from pptk.data.blocks import open_prepared
from pptk.data.corpus import (
    Corpus,
    build_corpus,
    check_entries_exist,
    collect_sets,
    document_labels,
    document_positions,
    sample_ranges,
)
from pptk.data.demo import demo_corpus, demo_documents, train_demo_tokenizer
from pptk.data.prepare import prepare_documents
from pptk.data.sampler import Shard
from pptk.errors import PptkError
from pptk.models import get_family
from pptk.models.decoder_families import family_of
from pptk.models.moe import router_loss_of
from pptk.parallel.pipeline import ModelSource, PipelinePlan, max_positions, resolve_model
from pptk.training.config import RunConfig
from pptk.training.observe import ExpertLoad
from pptk.training.task_hooks import Batch, Evaluation, replica_mean

TASK = "causal-lm"
# The embedded default (`--demo`): a small GPT-2 and a byte-level BPE trained on the standard library's docstrings.
DEMO_MODEL = dict(vocab_size=4096, n_embd=128, n_layer=4, n_head=4)
DEMO_SEQ_LEN = 64


@dataclass(frozen=True, kw_only=True)
class CausalLMData:
    files: tuple[Path, ...] = ()  # prepared directories (DIR or DIR:WEIGHT) and/or text files
    seq_len: int | None = None  # default: the model's positions
    eval_fraction: float = 0.05  # of each set's documents, held out whole
    demo: bool = False  # the embedded corpus and tokenizer; the model is DEMO_MODEL, or a family's small config
    data_cache: Path | None = None  # where text files are prepared (default: <output-dir>/data)
    document_masking: bool = False  # positions restart and attention stops at document boundaries


def demo_config(vocab_size: int, model_type: str | None):
    """The demo's model: a ~3.5M-parameter GPT-2, or the small config of another family (--demo --model llama)."""
    from transformers import GPT2Config

    if model_type in (None, "gpt2"):
        return GPT2Config(
            n_positions=DEMO_SEQ_LEN, bos_token_id=0, eos_token_id=0, **{**DEMO_MODEL, "vocab_size": vocab_size}
        )
    config = get_family(model_type).small_config()
    config.vocab_size = vocab_size
    config.max_position_embeddings = max(DEMO_SEQ_LEN, getattr(config, "max_position_embeddings", 0) or 0)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, name, None) is not None:
            setattr(config, name, 0)
    return config


def _model_and_sets(run: RunConfig) -> tuple[ModelSource, Any, list]:
    """The model, its tokenizer and the opened prepared sets (text files and the demo are prepared first)."""
    from transformers import AutoTokenizer

    data: CausalLMData = run.data
    cache_dir = data.data_cache or run.output.output_dir / "data"
    if data.demo:
        if run.model.model is not None:
            get_family(run.model.model)  # --demo --model llama: the embedded default with another family
        # Every rank trains the same tokenizer (deterministic, a second or two) and renames it into place atomically;
        # with --data-cache it lives there too, so runs sharing the cache train it once.
        tokenizer_home = data.data_cache / "demo-tokenizer" if data.data_cache else run.output.output_dir / "tokenizer"
        tokenizer_dir = train_demo_tokenizer(
            text=demo_corpus(), vocab_size=DEMO_MODEL["vocab_size"], out_dir=tokenizer_home
        )
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        config = demo_config(len(tokenizer), run.model.model)
        # Shuffled once, with a fixed seed: the documents held out for evaluation (the last --eval-fraction) are then
        # a sample of the corpus, not its last section (the language-reference topics, a quarter of the tokens).
        documents = demo_documents()
        order = np.random.default_rng(0).permutation(len(documents))
        demo_set = data.data_cache / "demo" if data.data_cache else cache_dir
        prepared = prepare_documents(
            [documents[i] for i in order], tokenizer=tokenizer, out=demo_set, name="pptk demo corpus, shuffled"
        )
        return ModelSource(config, None, f"demo {config.model_type}"), tokenizer, [(open_prepared(prepared.path), None)]
    if run.model.model is None or not data.files:
        raise PptkError("give --model and --data (or --demo for the embedded default)")
    check_entries_exist(data.files)  # before the model and tokenizer load
    source = resolve_model(run.model.model)
    tokenizer_dir = run.model.tokenizer or source.pretrained_dir or Path(run.model.model).parent
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return source, tokenizer, collect_sets(data.files, tokenizer=tokenizer, cache_dir=cache_dir)


def prepare(run: RunConfig) -> PreparedCausalLM:
    source, tokenizer, sets = _model_and_sets(run)
    positions = max_positions(source.config)
    seq_len = run.data.seq_len or (DEMO_SEQ_LEN if run.data.demo else positions)
    if seq_len is None:
        raise PptkError(f"{source.label} declares no max_position_embeddings; pass --seq-len")
    if positions is not None and seq_len > positions:
        raise PptkError(
            f"--seq-len {seq_len} is longer than the model's {positions} positions; use --seq-len {positions} or less"
        )
    corpus = build_corpus(
        sets,
        tokenizer=tokenizer,
        vocab_size=source.config.vocab_size,
        block_size=seq_len,
        eval_fraction=run.data.eval_fraction,
        seed=run.seed,
    )
    return PreparedCausalLM(
        source=source,
        tokenizer=tokenizer,
        seq_len=seq_len,
        corpus=corpus,
        document_masking=run.data.document_masking,
        sample_prompt=run.output.sample_prompt,
    )


@dataclass
class PreparedCausalLM:
    source: ModelSource
    tokenizer: Any
    seq_len: int
    corpus: Corpus
    document_masking: bool = False
    sample_prompt: str | None = None
    task: str = TASK
    dynamic_shape: bool = False
    samples_by_position: bool = True  # the trainer hands train_batch global sample indices (pptk.data.blocks)
    _extra: dict = field(default_factory=dict)
    _expert_load: ExpertLoad | None = None  # mixture of experts with a router loss (engine_ready)
    vocab_parallel_loss: ClassVar[bool] = True  # the loss is the plan's: at tp > 1 it reads vocabulary-split logits

    @property
    def num_train_examples(self) -> int:
        return len(self.corpus.train)

    def describe(self) -> str:
        return self.corpus.describe() + (", document masking" if self.document_masking else "")

    def tokens_per_example(self) -> float:
        return float(self.seq_len)

    def loss_fn(self, plan: PipelinePlan):
        return plan.loss_fn()

    def engine_ready(self, engine, shard: Shard) -> None:
        """Mixture of experts with a router loss: meter the router term and the expert load (every rank)."""
        family = family_of(self.source.config.model_type)
        router = router_loss_of(self.source.config, moe=family.moe if family else None)
        if router is not None:
            self._expert_load = ExpertLoad(engine, num_experts=router.num_experts)

    def step_metrics(self) -> dict[str, float]:
        """The router loss and per-stage expert load (collective; {} at once for a dense model, on every rank)."""
        return self._expert_load.metrics() if self._expert_load is not None else {}

    def batch(self, blocks: torch.Tensor) -> Batch:
        return lm_batch(blocks, eos_id=self.corpus.eos_id if self.document_masking else None)

    def train_batch(self, indices: np.ndarray, number: int, shard: Shard) -> Batch:
        return self.batch(self.corpus.train.read(indices))

    def evaluate(self, engine, shard: Shard, *, max_micro_batches: int) -> Evaluation | None:
        held_out = self.corpus.eval
        if held_out is None or len(held_out) < shard.examples_per_micro_batch:
            return None
        # never more micro-batches than each replica's share of the eval blocks; the same blocks every time
        count = min(max_micro_batches, len(held_out) // shard.examples_per_micro_batch)
        samples = sample_ranges(count, shard.dp_rank, shard.dp_size, shard.micro_batch_size)
        batches = [self.batch(held_out.read(s)) for s in samples]
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


def lm_batch(input_ids: torch.Tensor, *, eos_id: int | None = None) -> Batch:
    """Labels are the inputs (Hugging Face's causal-LM loss shifts them; packed blocks have no padding).

    eos_id (document masking): positions restart after every eos and travel as a third input, and no document
    is asked to predict the next one's first token.
    """
    mask = torch.ones_like(input_ids)
    if eos_id is None:
        return (input_ids, mask), input_ids.clone()
    positions = document_positions(input_ids, eos_id=eos_id)
    return (input_ids, mask, positions), document_labels(input_ids, positions)


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
