# The vocabulary split over the tensor-parallel ranks: embedding, LM head and cross-entropy, Megatron-style.
"""At tp > 1 a causal LM's token embedding and LM head (tied or not) hold ``ceil(V / tp)`` rows of the vocabulary
each, and no rank ever holds the full ``[tokens, V]`` logits:

- the embedding looks up the ids its rows cover, zeroes the others, and one all-reduce sums the ranks' parts
  (DeepSpeed's ``RowParallel``: all-reduce forward, identity backward);
- the LM head multiplies the replicated hidden states by its rows (DeepSpeed's ``ColumnParallel`` in front:
  identity forward, all-reduce of the input gradient backward), leaving each rank its slice of the logits;
- the loss is DeepSpeed's ``vocab_parallel_cross_entropy`` on those slices (an all-reduce of the max, of the sum of
  exponentials and of the target logit), shifted and averaged as Hugging Face's ``ForCausalLMLoss``.

A vocabulary that tp does not divide is padded with zero rows at the end (``ShardSpec.full``); the padding's
logits are set to -inf before the loss, so they take no probability and get no gradient, and every merge of the
slices (checkpoints, exports, ``pptk verify``) cuts the padding off. A tied pair's two copies, on the first and the
last stage, are cut the same way from the same initialisation or checkpoint, so DeepSpeed's tied-weight all-reduce
(per tp rank) keeps them identical.

The layers keep their Hugging Face parameter names; only the weight's rows change. DeepSpeed's own
``VocabParallelEmbedding``/``VocabParallelLinear`` wrap its AutoTP partitioning, which pptk does not use (its
slices are ``ShardSpec``s, read straight from safetensors), so only DeepSpeed's autograd functions and loss are
reused (pptk.deepspeed_compat).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from deepspeed.pipe import TiedLayerSpec
from torch import nn

from pptk.errors import PptkError
from pptk.models import PipeLayer
from pptk.models.common import LMHeadPipe, TokenEmbeddingPipe
from pptk.parallel.tensor_parallel import DEEPSPEED_TP_ATTR, SHARD_ATTR, ShardSpec, _shard

VOCAB_PARALLEL_TASKS = ("causal-lm",)  # the tasks whose loss reads the logits through vocab_parallel_causal_lm_loss


class VocabShard:
    """One tp rank's rows ``[start, end)`` of a ``vocab_size`` vocabulary padded to ``size * per_rank`` rows.

    Held by a sharded embedding (``vocab_shard``) and by the loss; not a module, so it is never saved."""

    def __init__(self, *, vocab_size: int, rank: int, size: int, group=None):
        self.vocab_size, self.rank, self.size, self.group = vocab_size, rank, size, group
        self.per_rank = -(-vocab_size // size)
        self.start = rank * self.per_rank
        self.end = self.start + self.per_rank
        self.padded = self.per_rank * size
        self.sequence: Any = None  # --sequence-parallel: the LM head gathers the sequence chunks first

    def spec(self) -> ShardSpec:
        return ShardSpec(
            dim=0, rank=self.rank, size=self.size, full=self.vocab_size if self.padded != self.vocab_size else 0
        )

    def lookup(self, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
        """The embeddings of ``ids``: this rank's rows looked up, the rest zero, summed over the tp ranks."""
        from pptk.deepspeed_compat import tensor_parallel_functions

        outside = (ids < self.start) | (ids >= self.end)
        local = (ids - self.start).masked_fill(outside, 0)
        pad = padding_idx - self.start if padding_idx is not None and self.start <= padding_idx < self.end else None
        parts = F.embedding(local, weight, pad).masked_fill(outside.unsqueeze(-1), 0.0)
        _, row = tensor_parallel_functions()
        return row.apply(self.group, parts, False)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the logits ``hidden @ weight.T``."""
        from pptk.deepspeed_compat import tensor_parallel_functions

        if self.sequence is not None:
            return F.linear(self.sequence.gather(hidden), weight)
        column, _ = tensor_parallel_functions()
        return F.linear(column.apply(self.group, hidden), weight)


class VocabSplit:
    """A plan's decision to split the vocabulary ``tp`` ways; the stage builder binds the tp group it learns from
    DeepSpeed's grid (``bind``), and the loss reads this rank's shard from it (``shard``)."""

    def __init__(self, vocab_size: int, tp: int):
        self.vocab_size, self.tp = vocab_size, tp
        self._shard: VocabShard | None = None

    @property
    def padded(self) -> int:
        return -(-self.vocab_size // self.tp) * self.tp

    def bind(self, group, rank: int) -> VocabShard:
        if self._shard is None or self._shard.rank != rank or self._shard.group is not group:
            self._shard = VocabShard(vocab_size=self.vocab_size, rank=rank, size=self.tp, group=group)
        return self._shard

    def shard(self) -> VocabShard:
        if self._shard is None:
            raise PptkError("the vocabulary-parallel loss ran before this rank built its LM head (no tp group bound)")
        return self._shard

    def causal_lm_loss(self, logits: torch.Tensor, labels: torch.Tensor, *, num_items_in_batch=None) -> torch.Tensor:
        """The causal-LM loss on this rank's slice of the logits (vocab_parallel_causal_lm_loss)."""
        return vocab_parallel_causal_lm_loss(logits, labels, shard=self.shard(), num_items_in_batch=num_items_in_batch)

    def __repr__(self) -> str:
        return f"VocabSplit(vocab_size={self.vocab_size}, tp={self.tp}, padded={self.padded})"


def is_vocab_layer(layer: PipeLayer) -> bool:
    """The token embedding or an LM head (tied or untied): the layers whose rows are the vocabulary."""
    spec = layer.spec
    if isinstance(spec, TiedLayerSpec) and spec.forward_fn is not None:
        return issubclass(spec.typename, TokenEmbeddingPipe)  # a tied LM head: the embedding's matrix, projected
    return layer.role in ("embed", "head") and issubclass(spec.typename, (TokenEmbeddingPipe, LMHeadPipe))


def vocab_parallel_problem(config, task: str, layers: list[PipeLayer], tp: int) -> str | None:
    """Why this model cannot split its vocabulary ``tp`` ways, or None."""
    if task not in VOCAB_PARALLEL_TASKS:
        return f"the {task} task's loss reads whole logits (vocabulary-parallel: {', '.join(VOCAB_PARALLEL_TASKS)})"
    if not any(is_vocab_layer(layer) and layer.role == "head" for layer in layers):
        return f"{config.model_type}'s LM head is not a plain projection onto the vocabulary"
    per_rank = -(-config.vocab_size // tp)
    if (tp - 1) * per_rank >= config.vocab_size:
        return f"vocab_size({config.vocab_size}) leaves tp rank {tp - 1} no row of its own"
    return None


def vocab_split_for(config, task: str, layers: list[PipeLayer], tp: int, *, wanted: bool | None) -> VocabSplit | None:
    """The plan's vocabulary split: None at tp=1 or when not wanted; where the model or task cannot take it, None
    when left to pptk (``wanted`` None) and an error when asked for (True)."""
    if tp == 1 or wanted is False:
        return None
    problem = vocab_parallel_problem(config, task, layers, tp)
    if problem is None:
        return VocabSplit(config.vocab_size, tp)
    if wanted:
        raise PptkError(f"--vocab-parallel: {problem}; drop --vocab-parallel to keep the vocabulary replicated")
    return None


@torch.no_grad()
def shard_vocab(layer: nn.Module, shard: VocabShard) -> bool:
    """Cut a built embedding or LM head to this rank's rows, in place; False when ``layer`` is neither."""
    if isinstance(layer, TokenEmbeddingPipe):
        spec = shard.spec()
        weight = nn.Parameter(spec.take(layer.weight.detach()), requires_grad=layer.weight.requires_grad)
        setattr(weight, SHARD_ATTR, spec)
        setattr(weight, DEEPSPEED_TP_ATTR, True)
        layer.weight = weight  # num_embeddings keeps the full vocabulary: the ids are checked against it
        layer.vocab_shard = shard
        return True
    if isinstance(layer, LMHeadPipe):
        _shard(
            layer, "lm_head", kind="column", group=shard.group, rank=shard.rank, size=shard.size, full=shard.spec().full
        )
        return True
    return False


def vocab_parallel_causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, shard: VocabShard, num_items_in_batch=None
) -> torch.Tensor:
    """Hugging Face's ``ForCausalLMLoss`` on this rank's slice of the logits: labels shifted left, -100 ignored,
    the fp32 token losses summed and divided by ``num_items_in_batch`` or by the micro-batch's counted tokens."""
    from pptk.deepspeed_compat import vocab_parallel_cross_entropy

    labels = F.pad(labels, (0, 1), value=-100)[..., 1:].to(logits.device)
    logits = logits.float()
    if shard.end > shard.vocab_size:  # this rank holds padding rows: no token may take probability there
        padding = torch.arange(shard.start, shard.end, device=logits.device) >= shard.vocab_size
        logits = logits.masked_fill(padding, float("-inf"))
    total = vocab_parallel_cross_entropy(
        logits, labels, group=shard.group, start=shard.start, end=shard.end, vocab_size=shard.vocab_size
    )
    if num_items_in_batch is None:
        return total / (labels != -100).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
