# Direct Preference Optimization (DPO) of a decoder on preference pairs, on DeepSpeed's pipeline engine.
"""``prepare(run)`` reads, checks and tokenizes the pairs (``pptk.data.pairs``) and the reference cache before any
rank starts. A micro-batch of ``micro_batch_size`` pairs holds 2 x that many rows of ``seq_len`` tokens, chosen and
rejected interleaved; the labels carry the answer targets, the reference log-probabilities and the pair indices to
the loss (``pptk.tasks.dpo_loss``). Before the first step, ``engine_ready`` fills the reference log-probabilities
(``pptk.tasks.dpo_reference``): from the cache when it exists for these inputs, else by one forward pass with the
start weights, or with LoRA with the adapters disabled. The export is an ``AutoModelForCausalLM`` with the chat
template.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pptk.data.chat_template import ChatTemplate, resolve_chat_template
from pptk.data.packing import pad_id_of
from pptk.data.pairs import EncodedPair, PreferencePair, check_format, encode_pairs, read_pairs, split_eval_pairs
from pptk.data.sampler import Shard
from pptk.errors import PptkError
from pptk.logs import get_logger
from pptk.parallel.pipeline import ModelSource, PipelinePlan, max_positions, resolve_model
from pptk.tasks.dpo_loss import IGNORE, METRICS, DpoLoss, check_loss_settings, dpo_terms
from pptk.tasks.dpo_reference import (
    ReferenceCache,
    adapters_disabled,
    collect_pair_logps,
    data_fingerprint,
    model_fingerprint,
    uses_adapters,
)
from pptk.training.config import RunConfig
from pptk.training.task_hooks import Batch, Evaluation

log = get_logger(__name__)
TASK = "causal-lm"  # what the pipeline computes and the export is: a causal LM
DEFAULT_SEQ_LEN = 2048  # capped at the model's positions
CACHE_DIR = "reference_logps"  # under --output-dir unless --reference-cache says otherwise


@dataclass(frozen=True, kw_only=True)
class DpoSettings:
    train: tuple[Path, ...]
    eval: tuple[Path, ...] = ()
    eval_fraction: float | None = None
    format: str | None = None  # None: detected from each file's first record
    chat_template: Path | None = None  # for a tokenizer without one
    seq_len: int | None = None
    beta: float = 0.1
    loss_type: str = "sigmoid"
    reference_cache: Path | None = None  # default: OUTPUT_DIR/reference_logps


def prepare(run: RunConfig) -> PreparedDpo:
    from transformers import AutoTokenizer

    settings: DpoSettings = run.data
    check_loss_settings(beta=settings.beta, loss_type=settings.loss_type)
    check_format(settings.format)
    if run.model.model is None:
        raise PptkError("give --model: a local Hugging Face decoder directory (with its tokenizer)")
    if settings.eval and settings.eval_fraction:
        raise PptkError("both --eval files and --eval-fraction were given; hold out either a file or a fraction")
    source = resolve_model(run.model.model)
    tokenizer_dir = run.model.tokenizer or source.pretrained_dir
    if tokenizer_dir is None:
        raise PptkError(f"{run.model.model} has no tokenizer; pass --tokenizer DIR")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    positions = max_positions(source.config)
    seq_len = settings.seq_len or min(DEFAULT_SEQ_LEN, positions or DEFAULT_SEQ_LEN)
    if positions is not None and seq_len > positions:
        raise PptkError(
            f"--seq-len {seq_len} is longer than the model's {positions} positions; use {positions} or less"
        )
    template = resolve_chat_template(tokenizer, settings.chat_template)
    train = read_pairs(settings.train, format=settings.format)
    held_out: list[PreferencePair] | None = read_pairs(settings.eval, format=settings.format) if settings.eval else None
    if settings.eval_fraction:
        train, held_out = split_eval_pairs(train, eval_fraction=settings.eval_fraction, seed=run.seed)
    encoded_train = encode_pairs(train, tokenizer, seq_len=seq_len, chat_template=template)
    encoded_eval = encode_pairs(held_out, tokenizer, seq_len=seq_len, chat_template=template) if held_out else None
    everything = encoded_train + (encoded_eval or [])
    _check_token_ids(everything, vocab_size=source.config.vocab_size, label=source.label)
    cache = _reference_cache(run, settings, source, everything, seq_len=seq_len)
    default_location = settings.reference_cache is None
    resuming = run.output.resume_from is not None
    reference = cache.load(replace_stale=run.output.overwrite and not resuming and default_location)
    if reference is None and resuming and run.lora is None:
        raise PptkError(
            f"resuming a DPO run needs the reference log-probabilities of its start weights, but {cache.directory} "
            "holds none for these inputs: point --reference-cache to the first run's cache (its OUTPUT_DIR/"
            f"{CACHE_DIR}), or start over"
        )
    tokenizer.chat_template = template.text  # saved with hf_config/, so the export carries it
    return PreparedDpo(
        source=source,
        tokenizer=tokenizer,
        seq_len=seq_len,
        train=encoded_train,
        eval=encoded_eval,
        template=template,
        settings=settings,
        cache=cache,
        reference=reference,
        reference_path=f"cache {cache.directory}" if reference is not None else "",
        pad_id=pad_id_of(tokenizer),
    )


def _reference_cache(
    run: RunConfig, settings: DpoSettings, source: ModelSource, pairs: list[EncodedPair], *, seq_len: int
) -> ReferenceCache:
    from pptk.training.engine import load_run_ds_config
    from pptk.training.observe import precision_of

    fingerprint = {
        "data": data_fingerprint(pairs),
        "model": model_fingerprint(source.pretrained_dir, config=source.config, seed=run.seed),
        "seq_len": seq_len,
        "precision": precision_of(load_run_ds_config(run)),
        "pairs": len(pairs),
    }
    return ReferenceCache(settings.reference_cache or run.output.output_dir / CACHE_DIR, fingerprint)


def _check_token_ids(pairs: list[EncodedPair], *, vocab_size: int, label: str) -> None:
    for pair in pairs:
        top = max(*pair.chosen_ids, *pair.rejected_ids)
        if top >= vocab_size:
            raise PptkError(
                f"{pair.where}: token id {top} is beyond {label}'s vocabulary of {vocab_size}; the tokenizer has "
                "tokens the model lacks (added special tokens?): resize the model's embeddings and save it, or use "
                "the model's own tokenizer"
            )


@dataclass
class PreparedDpo:
    source: ModelSource
    tokenizer: Any
    seq_len: int
    train: list[EncodedPair]
    eval: list[EncodedPair] | None
    template: ChatTemplate
    settings: DpoSettings
    cache: ReferenceCache
    reference: np.ndarray | None  # float64 [train + eval pairs, 2]: chosen, rejected
    reference_path: str
    pad_id: int
    task: str = TASK
    dynamic_shape: bool = False
    _loss: DpoLoss | None = None
    _extra: dict = field(default_factory=dict)

    @property
    def num_train_examples(self) -> int:
        return len(self.train)

    def describe(self) -> str:
        held_out = f", {len(self.eval)} held out" if self.eval else ""
        truncated = sum(p.truncated for p in self.train)
        return (
            f"{len(self.train)} preference pairs{held_out} ({truncated} with an answer cut at {self.seq_len} tokens), "
            f"{self.template.source}; DPO {self.settings.loss_type} loss, beta {self.settings.beta}"
        )

    def tokens_per_example(self) -> float:
        return 2.0 * self.seq_len

    def loss_fn(self, plan: PipelinePlan) -> DpoLoss:
        self._loss = DpoLoss(beta=self.settings.beta, loss_type=self.settings.loss_type)
        return self._loss

    # ---------------------------------------------------------------------------------------------- batches

    def _pair(self, index: int) -> EncodedPair:
        return self.train[index] if index < len(self.train) else (self.eval or [])[index - len(self.train)]

    def batch(self, indices: list[int]) -> Batch:
        """Pairs ``indices`` (into train + eval; -1: a filler that counts nowhere) as interleaved rows."""
        rows = 2 * len(indices)
        input_ids = torch.full((rows, self.seq_len), self.pad_id, dtype=torch.long)
        attention = torch.zeros((rows, self.seq_len), dtype=torch.long)
        targets = torch.full((rows, self.seq_len), IGNORE, dtype=torch.long)
        reference = torch.zeros(rows, dtype=torch.float64)
        pair_index = torch.full((rows,), -1, dtype=torch.long)
        for k, index in enumerate(indices):
            pair = self._pair(max(index, 0))
            sides = ((pair.chosen_ids, pair.chosen_answer_mask), (pair.rejected_ids, pair.rejected_answer_mask))
            for side, (ids, mask) in enumerate(sides):
                row, n = 2 * k + side, len(ids)
                input_ids[row, :n] = torch.tensor(ids)
                attention[row, :n] = 1
                targets[row, :n] = input_ids[row, :n].masked_fill(torch.tensor(mask) == 0, IGNORE)
                if index >= 0 and self.reference is not None:
                    reference[row] = float(self.reference[index, side])
            pair_index[2 * k : 2 * k + 2] = index
        positions = torch.arange(self.seq_len).repeat(rows, 1)
        return (input_ids, attention, positions), (targets, reference, pair_index)  # type: ignore[return-value]

    def train_batch(self, indices: np.ndarray, number: int, shard: Shard) -> Batch:
        return self.batch(np.asarray(indices).tolist())

    # ------------------------------------------------------------------------------------ the reference pass

    def engine_ready(self, engine: Any, shard: Shard) -> None:
        """Every rank, before the first step: the reference log-probabilities, from the cache or one pass."""
        import torch.distributed as dist

        lora = uses_adapters(engine.module)
        if self.reference is not None:
            self.reference_path = f"{self.reference_path} (computed earlier)"
            return
        count = len(self.train) + len(self.eval or [])
        assert self._loss is not None, "loss_fn() builds the engine's loss before engine_ready"
        with adapters_disabled(engine.module) if lora else nullcontext():
            values = collect_pair_logps(
                engine,
                self._loss,
                self.batch,
                count,
                dp_rank=shard.dp_rank,
                dp_size=shard.dp_size,
                pairs_per_micro_batch=shard.micro_batch_size,
            )
        self.reference = values
        self.reference_path = (
            "base model: LoRA adapters disabled, one forward pass" if lora else "start weights, one forward pass"
        )
        if dist.get_rank() == 0:
            self.cache.save(values, path_used=self.reference_path)
            log.info(
                f"DPO reference log-probabilities of {count} pairs ({self.reference_path}) -> {self.cache.directory}"
            )

    # -------------------------------------------------------------------------------------- metrics, eval

    def step_metrics(self) -> dict[str, float]:
        """TRL's rewards/* and logps/* over the pairs trained on since the last call, from the loss stage (a
        collective: every rank calls it at the same steps)."""
        import torch.distributed as dist

        window = self._loss.take_window() if self._loss is not None else {}
        sums = torch.tensor([window.get(name, 0.0) for name in (*METRICS, "count")], dtype=torch.float64)
        dist.all_reduce(sums)
        if sums[-1] == 0:
            return {}
        return {name: float(sums[i] / sums[-1]) for i, name in enumerate(METRICS)}

    def evaluate(self, engine: Any, shard: Shard, *, max_micro_batches: int) -> Evaluation | None:
        """The DPO loss and TRL's rewards over every held-out pair (one forward pass, all replicas)."""
        if not self.eval or self._loss is None or self.reference is None:
            return None
        first = len(self.train)
        policy = collect_pair_logps(
            engine,
            self._loss,
            self.batch,
            len(self.eval),
            first=first,
            dp_rank=shard.dp_rank,
            dp_size=shard.dp_size,
            pairs_per_micro_batch=shard.micro_batch_size,
        )
        terms = self.eval_terms(policy)
        return Evaluation(
            {"eval_loss": float(terms["losses"].mean())}
            | {f"eval_{name}": float(terms[name].mean()) for name in METRICS}
        )

    def eval_terms(self, policy: np.ndarray) -> dict[str, torch.Tensor]:
        """Per held-out pair: the loss and metrics of these policy log-probabilities against the reference."""
        assert self.eval is not None and self.reference is not None
        reference = np.array(self.reference[len(self.train) :])  # a copy: the cache is a read-only memory map
        counts = torch.tensor([[sum(p.chosen_answer_mask[1:]), sum(p.rejected_answer_mask[1:])] for p in self.eval])
        return dpo_terms(
            torch.from_numpy(policy).reshape(-1),
            torch.from_numpy(reference).reshape(-1),
            counts.reshape(-1),
            beta=self.settings.beta,
            loss_type=self.settings.loss_type,
        )

    def summary_extra(self) -> dict[str, Any]:
        return {
            "dpo_reference": self.reference_path,
            "reference_cache": str(self.cache.directory),
            "pairs": len(self.train),
            "truncated_pairs": sum(p.truncated for p in self.train),
            **self._extra,
        }

    def after_export(self, export_dir: Path) -> dict[str, Any]:
        return {}
