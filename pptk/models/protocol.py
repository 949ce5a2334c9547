# The stage protocol: the small, named tensors that cross a pipeline stage boundary, and the per-stage masks.
"""Every pptk family module follows this protocol, so any layer can sit at any stage boundary.

Pipeline inputs (read from the data iterator by the first stage only)::

    (input_ids, attention_mask)                      decoders (GPT-2, LLaMA, ...)
    (input_ids, attention_mask, token_type_ids)      encoders with segment ids (BERT)

    all int64 [batch, seq]; attention_mask is 1 for a real token and 0 for padding.

Between stages, three tensors::

    (hidden_states  float [batch, seq, hidden],
     attention_mask int64 [batch, seq],
     position_ids   int64 [batch, seq])

and, once a mixture-of-experts block has run with a router loss (pptk.models.moe), three more: the load-balancing
loss's partial sums over the layers so far::

     router_counts  int64 [experts],
     router_probs   fp32  [experts]   (its gradient flows back to every stage's routers),
     router_tokens  int64 [1])

The LM head passes them on after the logits, so the last stage's output is ``(logits, counts, probs, tokens)`` and
the loss adds the router term there.

Why this shape:
- DeepSpeed marks every floating-point tensor it receives ``requires_grad=True`` and sends gradients back for
  it; integer tensors travel without gradients. So masks and positions are int64, never float or bool.
- A [batch, 1, seq, seq] attention mask would cost seq times more bandwidth than the [batch, seq] padding mask.
  Each stage rebuilds its own 4-D mask (and rotary tables) with transformers' own mask functions, once per stage
  and micro-batch (see ``attention_mask_for``), so the numerics are Hugging Face's.
- DeepSpeed sends shapes once, on the first micro-batch. Batches whose sequence length changes need the
  pipeline built with ``dynamic_shape=True`` (pptk does that when asked for variable lengths).

The last stage returns the task's logits; DeepSpeed computes ``loss_fn(logits, labels)`` there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pptk.errors import PptkError
from pptk.models.moe import RouterSums


@dataclass(frozen=True)
class StageTensors:
    """The tensors that cross a stage boundary, named and checked."""

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    router: RouterSums | None = None  # mixture-of-experts router-loss partial sums, once a router has run

    @classmethod
    def from_tuple(cls, inputs: tuple[torch.Tensor, ...]) -> StageTensors:
        if not isinstance(inputs, tuple) or len(inputs) not in (3, 6):
            raise TypeError(
                "stage protocol: expected (hidden_states, attention_mask, position_ids[, router_counts, "
                f"router_probs, router_tokens]), got {_describe(inputs)}"
            )
        hidden, mask, positions = inputs[:3]
        if not hidden.is_floating_point() or hidden.dim() != 3:
            raise TypeError(
                f"stage protocol: hidden_states must be float [batch, seq, hidden], got {_describe(hidden)}"
            )
        for name, t in (("attention_mask", mask), ("position_ids", positions)):
            # the hidden states may be a sequence-parallel chunk (pptk.parallel.sequence_parallel): S / tp positions
            whole = t.dim() == 2 and t.shape[0] == hidden.shape[0] and t.shape[1] % hidden.shape[1] == 0
            if t.dtype != torch.long or not whole:
                raise TypeError(f"stage protocol: {name} must be int64 {list(hidden.shape[:2])}, got {_describe(t)}")
        router = RouterSums.check(*inputs[3:]) if len(inputs) == 6 else None
        return cls(hidden, mask, positions, router)

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        # DeepSpeed's p2p send needs contiguous tensors; a no-op for those that already are.
        sent = (self.hidden_states.contiguous(), self.attention_mask.contiguous(), self.position_ids.contiguous())
        return sent if self.router is None else sent + self.router.as_tuple()

    def with_router(self, sums: RouterSums | None) -> StageTensors:
        """Adds one block's router sums to those that arrived (None: the block has no router)."""
        if sums is None:
            return self
        return replace(self, router=sums if self.router is None else self.router + sums)

    def with_hidden(self, hidden_states: torch.Tensor) -> StageTensors:
        return replace(self, hidden_states=hidden_states)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor {x.dtype} {list(x.shape)}"
    if isinstance(x, tuple):
        return "(" + ", ".join(_describe(t) for t in x) + ")"
    return type(x).__name__


def check_input_ids(input_ids: torch.Tensor, *, vocab_size: int, max_positions: int | None) -> None:
    """Reject what would otherwise be an index error deep inside an embedding (or a CUDA device assert)."""
    if input_ids.dtype != torch.long:
        raise PptkError(f"input_ids must be int64 (torch.long), got {input_ids.dtype}; convert with .long()")
    seq_len = input_ids.shape[-1]
    if max_positions is not None and seq_len > max_positions:
        raise PptkError(
            f"sequence length {seq_len} is longer than the model's {max_positions} positions; "
            f"truncate or pack the inputs to at most {max_positions} tokens"
        )
    if input_ids.numel():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            raise PptkError(
                f"token id {high if high >= vocab_size else low} is outside the vocabulary [0, {vocab_size}); "
                "the tokenizer and the model disagree: use the model's own tokenizer, or resize the embeddings"
            )


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0..seq-1 for every row, as Hugging Face uses when no position_ids are passed (right padding)."""
    batch, seq = attention_mask.shape
    return torch.arange(seq, device=attention_mask.device).unsqueeze(0).repeat(batch, 1)


def attention_mask_for(kind: str, config, stage: StageTensors) -> torch.Tensor | None:
    """The 4-D (or None, when SDPA's is_causal suffices) mask transformers would build for this batch.

    kind: "causal", "sliding_window" (causal within config.sliding_window) or "bidirectional" (encoders).
    """
    from transformers import masking_utils

    hidden = stage.hidden_states
    length = stage.attention_mask.shape[1]
    if hidden.shape[1] != length:  # a sequence-parallel chunk: the attention sees the whole sequence
        hidden = hidden[:, :1].expand(-1, length, -1)
    if kind == "bidirectional":
        return masking_utils.create_bidirectional_mask(
            config=config, inputs_embeds=hidden, attention_mask=stage.attention_mask
        )
    build = {
        "causal": masking_utils.create_causal_mask,
        "sliding_window": masking_utils.create_sliding_window_causal_mask,
    }[kind]
    # Without padding the 2-D mask goes as None, as Hugging Face is called on packed batches: masking_utils then
    # reads packed documents from position_ids that restart (--document-masking) and blocks attention across
    # them; with the usual 0..seq-1 positions the mask is what an all-ones mask gives.
    padding = None if bool(stage.attention_mask.all()) else stage.attention_mask
    return build(
        config=config,
        inputs_embeds=hidden,
        attention_mask=padding,
        past_key_values=None,
        position_ids=stage.position_ids,
    )


class StageMasks:
    """The 4-D masks of one model's layers, built once per micro-batch and mask kind rather than once per layer.

    Every layer of a stage receives the same mask and position tensors (the same objects) from the layer before
    it, so the last mask of each kind is reused while those objects are the same. One instance is shared by the
    blocks of one model (the family module passes it to every block's LayerSpec): the cache lives and dies with the
    model, never process-wide.
    """

    def __init__(self) -> None:
        self._last: dict[str, tuple[tuple, torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    def __call__(self, kind: str, config, stage: StageTensors) -> torch.Tensor | None:
        key = (id(config), config._attn_implementation, tuple(stage.attention_mask.shape), stage.hidden_states.dtype)
        cached = self._last.get(kind)
        if cached is not None:
            cached_key, cached_mask, cached_positions, mask = cached
            if cached_key == key and cached_mask is stage.attention_mask and cached_positions is stage.position_ids:
                return mask
        mask = attention_mask_for(kind, config, stage)
        self._last[kind] = (key, stage.attention_mask, stage.position_ids, mask)
        return mask

    def __repr__(self) -> str:  # shown in DeepSpeed's LayerSpec descriptions
        return "StageMasks()"
