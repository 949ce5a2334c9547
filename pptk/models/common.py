# Pipeline layers shared by every family: the token embedding (tied to the LM head), an untied head, the final norm.
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pptk.models.protocol import StageTensors, check_input_ids, default_position_ids

WORD_EMBEDDINGS = "word_embeddings"  # the TiedLayerSpec key shared by the input embedding and a tied LM head


class TokenEmbeddingPipe(nn.Embedding):
    """input_ids -> embeddings; starts the stage protocol.

    Subclasses nn.Embedding so that the tied parameter is simply ``weight`` (TiedLayerSpec's tied_weight_attr).
    Inputs: (input_ids, attention_mask, *extra), or (input_ids, attention_mask, position_ids) for decoders;
    outputs (embeddings, attention_mask, position_ids, *extra), where extra (token_type_ids for BERT) is consumed by
    the next embedding layer on the same stage.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        padding_idx: int | None = None,
        max_positions: int | None = None,
        positions_in_inputs: bool = False,
    ):
        super().__init__(vocab_size, hidden_size, padding_idx=padding_idx)
        self.max_positions = max_positions
        # decoders: a third input, when given, is position_ids (packed documents restart their positions)
        self.positions_in_inputs = positions_in_inputs
        self.vocab_shard: Any = None

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        input_ids, attention_mask, *extra = inputs
        check_input_ids(input_ids, vocab_size=self.num_embeddings, max_positions=self.max_positions)
        shard = self.vocab_shard  # at tp > 1 a causal LM's rows are split (pptk.parallel.vocab_parallel)
        embeddings = (
            super().forward(input_ids) if shard is None else shard.lookup(input_ids, self.weight, self.padding_idx)
        )
        if self.positions_in_inputs and len(extra) == 1:
            return (embeddings, attention_mask.long(), extra[0].long())
        return (embeddings, attention_mask.long(), default_position_ids(attention_mask), *extra)


def tied_lm_logits(embedding: TokenEmbeddingPipe, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """forward_fn of the LM head's TiedLayerSpec: project onto the (shared) word-embedding matrix (this tp rank's
    rows of it when the vocabulary is split)."""
    if embedding.vocab_shard is not None:
        return embedding.vocab_shard.logits(inputs[0], embedding.weight)
    return F.linear(inputs[0], embedding.weight)


class LMHeadPipe(nn.Module):
    """An untied LM head (``tie_word_embeddings=False``); the parameter is named as in Hugging Face: lm_head.weight."""

    def __init__(self, hidden_size: int, vocab_size: int, *, bias: bool = False):
        super().__init__()
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=bias)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.lm_head(inputs[0])


class FinalNormPipe(nn.Module):
    """The final norm, held under the attribute name the family uses (ln_f, norm, ...) so weights map by prefix."""

    def __init__(self, norm_class: type[nn.Module], *norm_args, attr: str, **norm_kwargs):
        super().__init__()
        self.attr = attr
        self.add_module(attr, norm_class(*norm_args, **norm_kwargs))

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        stage = StageTensors.from_tuple(inputs)
        return stage.with_hidden(getattr(self, self.attr)(stage.hidden_states)).as_tuple()


def hf_initializer(config, hf_class: type[Any]):
    """Hugging Face's own ``_init_weights`` for this family, usable on a lone layer.

    A bare instance (no __init__, only ``config``) of the family's PreTrainedModel is enough to call the method,
    so pipeline layers start from exactly the distributions a from-scratch Hugging Face model uses.
    """
    shell = object.__new__(hf_class)
    shell.__dict__["config"] = config
    return shell._init_weights


@torch.no_grad()
def init_layer_like_hf(module: nn.Module, *, config, hf_class: type[Any], seed: int) -> None:
    # Seeded per layer (not per rank) so that a from-scratch model is the same whatever the number of stages, and
    # both copies of a tied embedding start equal without communication.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module.apply(hf_initializer(config, hf_class))  # children first, as Hugging Face applies it
