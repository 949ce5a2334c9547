# The decoder families pptk registers: what each one's model-level forward adds beyond embed -> layers -> norm ->
# lm_head (read from transformers 5.23), and the small config each is tested with. pptk.models.decoder builds them.
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------------------------------------------
# Families: what the model-level forward adds (read from transformers 5.23), and a small config to test each with


@dataclass(frozen=True)
class Family:
    small: dict  # small_config() overrides of SMALL_COMMON
    embedding_multiplier: str | None = None  # config field: embeddings * value (Granite, HyperCLOVA X)
    embedding_dropout: str | None = None  # config field: dropout on the embeddings (StarCoder2)
    logits: tuple[tuple[str, str], ...] = ()  # (op, config field) applied to the LM head's output
    # mixture of experts (pptk.models.moe): "switch" = HF's load_balancing_loss_func when output_router_logits is
    # set, "none" = MoE blocks without any auxiliary loss (DeepSeek-V3); None = a dense family
    moe: str | None = None
    unsupported: dict[str, Callable[[object], bool]] = field(default_factory=dict)


# hidden 64, 4 layers, 4 heads (2 key/value heads: grouped-query attention), windows of 8 tokens where the family has
# them (shorter than the tests' 32), a vocabulary of 256; tie_word_embeddings alternates so both heads are tested.
SMALL_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.05,
)
WINDOW = 8
ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=16,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
)

# Mixture of experts: 4 experts, 2 active, the router loss on (output_router_logits) with each family's own
# router_aux_loss_coef (OLMoE 0.01, the others 0.001), as Hugging Face's model adds it.
SMALL_MOE = dict(num_experts_per_tok=2, output_router_logits=True)

FAMILIES: dict[str, Family] = {
    "llama": Family(small=dict(tie_word_embeddings=False, attention_bias=True)),
    "mistral": Family(small=dict(tie_word_embeddings=False, sliding_window=WINDOW)),
    "qwen2": Family(
        small=dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)
    ),
    "qwen3": Family(small=dict(tie_word_embeddings=False)),
    "phi3": Family(small=dict(tie_word_embeddings=True, sliding_window=WINDOW)),
    "gemma": Family(small=dict(tie_word_embeddings=True)),
    "gemma2": Family(
        small=dict(
            tie_word_embeddings=True,
            sliding_window=WINDOW,
            query_pre_attn_scalar=16,
            final_logit_softcapping=0.5,
            attn_logit_softcapping=2.0,
        ),
        logits=(("softcap", "final_logit_softcapping"),),
    ),
    "olmo2": Family(small=dict(tie_word_embeddings=False)),
    "granite": Family(
        small=dict(
            tie_word_embeddings=True,
            embedding_multiplier=3.0,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
            logits_scaling=4.0,
        ),
        embedding_multiplier="embedding_multiplier",
        logits=(("div", "logits_scaling"),),
    ),
    "gemma3_text": Family(
        small=dict(
            tie_word_embeddings=True,
            sliding_window=WINDOW,
            layer_types=ALTERNATING,
            query_pre_attn_scalar=16,
            final_logit_softcapping=0.5,
            attn_logit_softcapping=None,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
        logits=(("softcap", "final_logit_softcapping"),),
        unsupported={"use_bidirectional_attention": bool},
    ),
    "vaultgemma": Family(
        small=dict(
            tie_word_embeddings=True,
            sliding_window=WINDOW,
            query_pre_attn_scalar=16,
            final_logit_softcapping=0.5,
            attn_logit_softcapping=2.0,
        ),
        logits=(("softcap", "final_logit_softcapping"),),
    ),
    "olmo": Family(small=dict(tie_word_embeddings=True, clip_qkv=0.5)),
    "olmo3": Family(small=dict(tie_word_embeddings=False, sliding_window=WINDOW)),
    "cohere": Family(
        small=dict(tie_word_embeddings=True, logit_scale=0.5, use_qk_norm=True), logits=(("mul", "logit_scale"),)
    ),
    "cohere2": Family(
        small=dict(tie_word_embeddings=True, logit_scale=0.5, sliding_window=WINDOW, layer_types=ALTERNATING),
        logits=(("mul", "logit_scale"),),
    ),
    "starcoder2": Family(
        small=dict(tie_word_embeddings=False, sliding_window=WINDOW, use_bias=True),
        embedding_dropout="embedding_dropout",
    ),
    "helium": Family(small=dict(tie_word_embeddings=False)),
    "glm": Family(small=dict(tie_word_embeddings=False)),
    "glm4": Family(small=dict(tie_word_embeddings=True)),
    "smollm3": Family(
        small=dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW, no_rope_layer_interval=2)
    ),
    "ministral": Family(small=dict(tie_word_embeddings=False, sliding_window=WINDOW, layer_types=ALTERNATING)),
    "ministral3": Family(
        small=dict(
            tie_word_embeddings=True,
            sliding_window=WINDOW,
            # YaRN over 16 original positions, and Llama 4's query scaling that grows every 16 positions
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=16,
                beta_fast=32.0,
                beta_slow=1.0,
                llama_4_scaling_beta=0.1,
            ),
        )
    ),
    "seed_oss": Family(small=dict(tie_word_embeddings=False, attention_bias=True)),
    "arcee": Family(small=dict(tie_word_embeddings=True)),
    "exaone4": Family(small=dict(tie_word_embeddings=False, sliding_window=WINDOW, sliding_window_pattern=2)),
    "ernie4_5": Family(small=dict(tie_word_embeddings=True, use_bias=True)),
    "hyperclovax": Family(
        small=dict(
            tie_word_embeddings=False,
            embedding_multiplier=3.0,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
            logits_scaling=0.25,
        ),
        embedding_multiplier="embedding_multiplier",
        logits=(("mul", "logits_scaling"),),
    ),
    "apertus": Family(small=dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)),
    "jais2": Family(small=dict(tie_word_embeddings=True)),
    "cwm": Family(small=dict(tie_word_embeddings=False, sliding_window=WINDOW, rope_parameters=LLAMA3_ROPE)),
    "youtu": Family(
        small=dict(  # multi-head latent attention (low-rank q and kv, a rotary slice of each head)
            tie_word_embeddings=True,
            kv_lora_rank=32,
            q_lora_rank=48,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            head_dim=8,
            num_key_value_heads=4,
        )
    ),
}

# Mixture-of-experts families (pptk.models.moe), kept apart from FAMILIES: tensor parallelism, LoRA targets and
# checkpoint reading do not cover their experts yet, and the tables and tests of those iterate FAMILIES.
MOE_FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        small=dict(**SMALL_MOE, tie_word_embeddings=False, num_local_experts=4, sliding_window=WINDOW),
        moe="switch",
    ),
    "qwen2_moe": Family(  # a shared expert beside the routed ones; layer 2 dense (mlp_only_layers)
        small=dict(
            **SMALL_MOE,
            tie_word_embeddings=True,
            num_experts=4,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            mlp_only_layers=[2],
        ),
        moe="switch",
    ),
    "qwen3_moe": Family(  # layer 0 dense: the first stage may send no router sums
        small=dict(
            **SMALL_MOE,
            tie_word_embeddings=False,
            num_experts=4,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[0],
        ),
        moe="switch",
    ),
    "olmoe": Family(
        small=dict(**SMALL_MOE, tie_word_embeddings=False, num_experts=4, intermediate_size=32, clip_qkv=0.5),
        moe="switch",
    ),
    "flex_olmo": Family(
        small=dict(**SMALL_MOE, tie_word_embeddings=True, num_experts=4, intermediate_size=32),
        moe="switch",
    ),
    "granitemoe": Family(
        small=dict(
            **SMALL_MOE,
            tie_word_embeddings=True,
            num_local_experts=4,
            intermediate_size=32,
            embedding_multiplier=3.0,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
            logits_scaling=4.0,
        ),
        embedding_multiplier="embedding_multiplier",
        logits=(("div", "logits_scaling"),),
        moe="switch",
    ),
    "granitemoeshared": Family(  # GraniteMoE with a shared expert
        small=dict(
            **SMALL_MOE,
            tie_word_embeddings=False,
            num_local_experts=4,
            intermediate_size=32,
            shared_intermediate_size=48,
            embedding_multiplier=3.0,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
            logits_scaling=4.0,
        ),
        embedding_multiplier="embedding_multiplier",
        logits=(("div", "logits_scaling"),),
        moe="switch",
    ),
    "gpt_oss": Family(  # attention sinks: eager attention only
        small=dict(
            **SMALL_MOE,
            tie_word_embeddings=False,
            num_local_experts=4,
            intermediate_size=32,
            sliding_window=WINDOW,
            layer_types=ALTERNATING,
        ),
        moe="switch",
    ),
    "deepseek_v3": Family(  # latent attention, a shared expert, layer 0 dense; Hugging Face adds no router loss
        small=dict(
            tie_word_embeddings=False,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            kv_lora_rank=32,
            q_lora_rank=48,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            head_dim=8,
            num_key_value_heads=4,
        ),
        moe="none",
    ),
}


def family_of(model_type: str) -> Family | None:
    """The table entry of a decoder family, dense or mixture-of-experts; None for other families (GPT-2, BERT)."""
    return FAMILIES.get(model_type) or MOE_FAMILIES.get(model_type)
