# GPT-2 as pipeline layers: token embedding (tied to the LM head), position embedding, blocks, final norm, head.
from __future__ import annotations

from functools import partial

import torch
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from pptk.models import ModelFamily, PipeLayer, register
from pptk.models.common import WORD_EMBEDDINGS, FinalNormPipe, LMHeadPipe, TokenEmbeddingPipe, tied_lm_logits
from pptk.models.heads import ScoreHeadPipe, reward_layers
from pptk.models.protocol import StageMasks, StageTensors

PREFIX = "transformer."  # GPT2LMHeadModel.base_model_prefix


class GPT2PositionEmbeddingPipe(nn.Module):
    """Adds learned position embeddings and embedding dropout (GPT2Model.wpe / .drop)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.drop = nn.Dropout(config.embd_pdrop)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        stage = StageTensors.from_tuple(inputs)
        hidden = stage.hidden_states + self.wpe(stage.position_ids)
        return stage.with_hidden(self.drop(hidden)).as_tuple()


class GPT2BlockPipe(GPT2Block):
    """transformers' own GPT2Block, speaking the stage protocol; the mask is rebuilt here, once per stage."""

    def __init__(self, config: GPT2Config, layer_idx: int, masks: StageMasks):
        super().__init__(config, layer_idx=layer_idx)
        self.config = config
        self.masks = masks  # shared by the model's blocks: one mask per micro-batch, not per layer

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        stage = StageTensors.from_tuple(inputs)
        mask = self.masks("causal", self.config, stage)
        hidden = super().forward(stage.hidden_states, attention_mask=mask, position_ids=stage.position_ids)
        return stage.with_hidden(hidden).as_tuple()


def _body_layers(config: GPT2Config, *, tied: bool) -> list[PipeLayer]:
    """Token and position embeddings, blocks, final norm; the token embedding is tied when an LM head shares it."""
    embed_args = (TokenEmbeddingPipe, config.vocab_size, config.hidden_size)
    embed_kwargs = dict(max_positions=config.max_position_embeddings, positions_in_inputs=True)
    embed = (
        TiedLayerSpec(WORD_EMBEDDINGS, *embed_args, **embed_kwargs, tied_weight_attr="weight")
        if tied
        else LayerSpec(*embed_args, **embed_kwargs)
    )
    layers = [
        PipeLayer(embed, "embed", PREFIX + "wte."),
        PipeLayer(LayerSpec(GPT2PositionEmbeddingPipe, config), "embed", PREFIX),
    ]
    masks = StageMasks()
    layers += [
        PipeLayer(LayerSpec(GPT2BlockPipe, config, i, masks), "block", f"{PREFIX}h.{i}.")
        for i in range(config.num_hidden_layers)
    ]
    final_norm = LayerSpec(FinalNormPipe, nn.LayerNorm, config.hidden_size, eps=config.layer_norm_epsilon, attr="ln_f")
    layers.append(PipeLayer(final_norm, "head", PREFIX))
    return layers


def causal_lm_layers(config: GPT2Config) -> list[PipeLayer]:
    layers = _body_layers(config, tied=True)
    if config.tie_word_embeddings:
        head = TiedLayerSpec(
            WORD_EMBEDDINGS,
            TokenEmbeddingPipe,
            config.vocab_size,
            config.hidden_size,
            max_positions=config.max_position_embeddings,
            positions_in_inputs=True,
            tied_weight_attr="weight",
            forward_fn=tied_lm_logits,
        )
        layers.append(PipeLayer(head, "head", PREFIX + "wte."))
    else:
        layers.append(PipeLayer(LayerSpec(LMHeadPipe, config.hidden_size, config.vocab_size), "head", ""))
    return layers


def sequence_classification_layers(config: GPT2Config) -> list[PipeLayer]:
    """GPT2ForSequenceClassification: the base model, then ``score`` (no bias) on each row's last token, as the
    generic decoder classifier (pptk.models.heads.ScoreHeadPipe); optional, as a causal-LM checkpoint has none."""
    score = LayerSpec(ScoreHeadPipe, config.hidden_size, config.num_labels)
    return [*_body_layers(config, tied=False), PipeLayer(score, "head", "score.", optional=True)]


def small_config() -> GPT2Config:
    return GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0)


register(
    ModelFamily(
        model_type="gpt2",
        tasks={
            "causal-lm": causal_lm_layers,
            "sequence-classification": sequence_classification_layers,
            "reward": partial(reward_layers, sequence_classification_layers),
        },
        small_config=small_config,
        default_task="causal-lm",
        unsupported={"add_cross_attention": bool},  # encoder-decoder use of GPT-2 has no pipeline form here
    )
)
