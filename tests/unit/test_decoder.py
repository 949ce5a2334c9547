# The generic decoder family module in one process: exact parity with Hugging Face for every registered family (logits,
# loss, every gradient, weights read from sharded safetensors), rotary variants, refusals, and the per-stage caches.
import copy
import inspect
import re

import pytest
import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, AutoModel, AutoModelForCausalLM

from pptk.errors import PptkError
from pptk.models import get_family, supported_model_types
from pptk.models.decoder import RotaryTables, decoder_parts, layer_mask_kinds
from pptk.models.decoder_families import FAMILIES, LLAMA3_ROPE, MOE_FAMILIES, SMALL_COMMON, WINDOW, family_of
from pptk.parallel.hf_weights import INDEX_FILE, HFCheckpoint, hf_names, load_stage_weights
from pptk.parallel.pipeline import build_sequential_module, plan_pipeline

EAGER_ONLY = {"gemma2", "vaultgemma"}  # attention soft-capping: transformers has no SDPA path for them
SEQ_LEN = 32


def attn_for(model_type: str) -> str:
    return "eager" if model_type in EAGER_ONLY else "sdpa"


def right_padded_batch(config, *, lengths=(SEQ_LEN, 21, 9), seed=0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, config.vocab_size, (len(lengths), SEQ_LEN), generator=gen)
    attention_mask = (torch.arange(SEQ_LEN)[None, :] < torch.tensor(lengths)[:, None]).long()
    pad = config.pad_token_id or 0
    input_ids[:, 3] = pad  # the pad id as a real token too (pad = eos in many recipes): its row gets no gradient
    input_ids = input_ids.masked_fill(attention_mask == 0, pad)
    return input_ids, attention_mask, input_ids.masked_fill(attention_mask == 0, -100)


def pipeline_and_reference(config, tmp_path, *, attn: str = "sdpa"):
    """A random Hugging Face model saved in 100 KB shards, and the sequential pipeline built from that directory."""
    plan = plan_pipeline(config, num_stages=1, attn_implementation=attn, dropout=False)
    torch.manual_seed(0)
    reference = plan.hf_class(plan.config)
    reference.save_pretrained(tmp_path, max_shard_size="100KB")
    plan = plan_pipeline(tmp_path, num_stages=1, attn_implementation=attn, dropout=False)
    return plan, build_sequential_module(plan), reference


def assert_parity(config, tmp_path, *, attn: str = "sdpa", tol: float = 1e-6):
    plan, pipe, reference = pipeline_and_reference(config, tmp_path, attn=attn)
    input_ids, attention_mask, labels = right_padded_batch(plan.config)
    reference.train()
    pipe.train()
    out = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    logits = pipe((input_ids, attention_mask))
    loss = plan.loss_fn()(logits, labels)
    loss.backward()

    torch.testing.assert_close(logits, out.logits, rtol=0, atol=tol)
    assert abs(loss.item() - out.loss.item()) <= tol * abs(out.loss.item())
    names = hf_names(pipe, plan.layers)
    hf_params = dict(reference.named_parameters())
    pipe_params = {names[key]: p for key, p in pipe.named_parameters()}
    assert sorted(pipe_params) == sorted(hf_params)  # same names (tied weights once), nothing missing
    for name, param in pipe_params.items():
        assert param.shape == hf_params[name].shape, name
        torch.testing.assert_close(param.grad, hf_params[name].grad, rtol=0, atol=tol, msg=name)
    return plan, out


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_matches_hugging_face_from_sharded_weights(model_type, tmp_path):
    _plan, out = assert_parity(get_family(model_type).small_config(), tmp_path, attn=attn_for(model_type))
    assert (tmp_path / INDEX_FILE).is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    assert out.logits.abs().max() > 0.1  # a real signal, not a vanishing one


@pytest.mark.parametrize("model_type", ["gemma", "qwen3"])  # tied and untied heads
def test_each_stage_loads_its_own_tensors_from_the_shards(model_type, tmp_path):
    """What a rank does: build only its stage's layers and read their tensors from the sharded index."""
    config = get_family(model_type).small_config()
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config)
    reference.save_pretrained(tmp_path, max_shard_size="100KB")
    plan = plan_pipeline(tmp_path, num_stages=3, dropout=False)
    checkpoint = HFCheckpoint(tmp_path)
    expected = reference.state_dict()
    loaded = set()
    for stage in range(3):
        module = nn.Module()  # the layout of a PipelineModule's stage: "{index}.*" and "tied_modules.{key}.*"
        module.tied_modules = nn.ModuleDict()
        for cost in plan.stages.stage_layers(stage):
            layer = plan.layers[cost.index]
            if layer.tied_key:
                module.tied_modules[layer.tied_key] = layer.spec.build()
            else:
                module.add_module(str(cost.index), layer.spec.build())
        load_stage_weights(module, plan.layers, checkpoint, base_model_prefix="model")
        for key, hf_name in hf_names(module, plan.layers).items():
            torch.testing.assert_close(module.state_dict()[key], expected[hf_name], rtol=0, atol=0)
            loaded.add(hf_name)
    assert loaded == {name for name, _ in reference.named_parameters()}


@pytest.mark.parametrize(
    "rope",
    [
        dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
        dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0),
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, rope_theta=10000.0),
        LLAMA3_ROPE,
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_scaling_types_match(rope, tmp_path):
    assert_parity(AutoConfig.for_model("llama", **SMALL_COMMON, rope_parameters=rope), tmp_path)


def test_longrope_switches_to_long_factors_like_hugging_face(tmp_path):
    # 32 positions > 16 original ones: Phi-3's rotary picks its long factors from the position ids on each stage
    config = AutoConfig.for_model(
        "phi3",
        **SMALL_COMMON,
        original_max_position_embeddings=16,
        rope_parameters=dict(
            rope_type="longrope",
            rope_theta=10000.0,
            original_max_position_embeddings=16,
            short_factor=[1.0] * 8,
            long_factor=[1.0 + i for i in range(8)],
        ),
    )
    assert_parity(config, tmp_path)


def test_small_configs_are_small_and_exercise_what_they_claim():
    ties = set()
    for model_type in FAMILIES:
        config = get_family(model_type).small_config()
        assert config.model_type == model_type
        assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 4, 256)
        assert config.num_key_value_heads < config.num_attention_heads or model_type == "youtu", model_type
        ties.add(config.tie_word_embeddings)
    assert ties == {True, False}
    sliding = {t for t in FAMILIES if "sliding_window" in layer_mask_kinds(get_family(t).small_config())}
    assert {"mistral", "qwen2", "gemma2", "phi3", "starcoder2", "gemma3_text", "olmo3", "cohere2"} <= sliding
    for model_type in sliding:
        assert get_family(model_type).small_config().sliding_window == WINDOW < SEQ_LEN
    # Mixed layer types where the family has them, so both masks are used by one model
    assert set(layer_mask_kinds(get_family("gemma2").small_config())) == {"causal", "sliding_window"}
    assert layer_mask_kinds(get_family("qwen2").small_config()) == ["causal"] * 2 + ["sliding_window"] * 2


def test_the_window_changes_the_answer(tmp_path):
    """A pipeline ignoring the sliding window could not pass parity: the window matters on the test batch."""
    config = get_family("mistral").small_config()
    torch.manual_seed(0)
    with_window = AutoModelForCausalLM.from_config(config)
    unwindowed = copy.deepcopy(config)
    unwindowed.sliding_window = None
    no_window = AutoModelForCausalLM.from_config(unwindowed)
    no_window.load_state_dict(with_window.state_dict())
    input_ids, attention_mask, _ = right_padded_batch(config)
    a = with_window(input_ids=input_ids, attention_mask=attention_mask).logits
    b = no_window(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (a - b).abs().max() > 1e-3


def test_layers_map_to_hugging_face_names_and_heads_follow_tying():
    for model_type, head in (("llama", "LMHeadPipe"), ("gemma", "DecoderEmbeddingPipe")):
        plan = plan_pipeline(model_type, num_stages=3)
        prefixes = [layer.hf_prefix for layer in plan.layers]
        assert prefixes[0] == "model.embed_tokens."
        assert prefixes[1:5] == [f"model.layers.{i}." for i in range(4)]
        assert plan.layers[5].class_name == "FinalNormPipe" and prefixes[5] == "model."
        assert plan.layers[6].class_name == head
        assert prefixes[6] == ("" if head == "LMHeadPipe" else "model.embed_tokens.")
        assert {layer.class_name for layer in plan.layers if layer.role == "block"} == {
            f"{model_type.capitalize()}DecoderLayerPipe"
        }
        assert [len(plan.stages.stage_layers(s)) for s in range(3)] == [2, 2, 3]
    # Families whose causal-LM forward post-processes the logits get one parameter-free layer for it, last
    granite = plan_pipeline("granite", num_stages=2)
    assert granite.layers[-1].class_name == "LogitsPipe" and granite.layers[-1].role == "head"


def test_rotary_tables_are_computed_once_per_stage_and_micro_batch():
    for model_type, expected_calls in (("llama", 1), ("gemma3_text", 2)):  # Gemma 3: one table per layer type
        plan = plan_pipeline(model_type, num_stages=1, dropout=False)
        pipe = build_sequential_module(plan)
        rotary = plan.layers[1].spec.module_kwargs["rotary"]
        assert isinstance(rotary, RotaryTables)
        assert all(layer.spec.module_kwargs["rotary"] is rotary for layer in plan.layers if layer.role == "block")
        input_ids, attention_mask, _ = right_padded_batch(plan.config)
        pipe((input_ids, attention_mask))  # builds the rotary module on this device
        calls: list[int] = []
        (module,) = rotary._modules.values()
        module.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        pipe((input_ids, attention_mask))
        assert len(calls) == expected_calls, model_type
        pipe((input_ids, attention_mask))  # a new micro-batch: new position ids, new tables
        assert len(calls) == 2 * expected_calls


def test_rotary_module_stays_fp32_and_out_of_the_state_dict():
    plan = plan_pipeline("llama", num_stages=1)
    pipe = build_sequential_module(plan).to(torch.bfloat16)
    assert not any("inv_freq" in key or "rotary" in key for key in pipe.state_dict())
    input_ids, attention_mask, _ = right_padded_batch(plan.config)
    logits = pipe((input_ids, attention_mask))
    assert logits.dtype == torch.bfloat16
    (module,) = plan.layers[1].spec.module_kwargs["rotary"]._modules.values()
    assert module.inv_freq.dtype == torch.float32


def test_unknown_model_type_lists_the_supported_ones():
    with pytest.raises(PptkError) as err:
        get_family("mamba")
    message = str(err.value)
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gpt2"):
        assert model_type in message
    assert set(FAMILIES) <= set(supported_model_types())
    with pytest.raises(PptkError, match="has no pptk family module; supported: .*llama.*qwen3"):
        plan_pipeline(AutoConfig.for_model("mamba"), num_stages=2)  # a state-space model: no decoder layers to wrap


def test_families_of_another_shape_are_refused_by_the_generic_reader():
    with pytest.raises(PptkError, match="base_model_pp_plan"):
        decoder_parts(AutoConfig.for_model("phi"))  # embed_dropout / final_layernorm: not embed->layers->norm
    with pytest.raises(PptkError, match="base_model_pp_plan"):
        decoder_parts(AutoConfig.for_model("gpt2"))


def test_soft_capped_gemma2_refuses_sdpa_with_the_fix():
    with pytest.raises(PptkError, match="attn_implementation='eager'"):
        plan_pipeline("gemma2", num_stages=2, attn_implementation="sdpa")
    plan_pipeline("gemma2", num_stages=2, attn_implementation="eager")


@pytest.mark.parametrize(
    ("model_type", "override", "match"),
    [
        (
            "llama",
            dict(rope_parameters=dict(rope_type="proportional", rope_theta=10000.0, partial_rotary_factor=0.5)),
            "rope_type proportional",
        ),
        (
            "qwen2",
            dict(use_sliding_window=False, layer_types=["full_attention", "sliding_attention"] * 2),
            "use_sliding_window=False",
        ),
        ("gemma2", dict(layer_types=["full_attention", "chunked_attention"] * 2), "chunked_attention"),
        ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        ("llama", dict(num_local_experts=4), "mixture-of-experts blocks are supported only for"),
    ],
)
def test_settings_the_pipeline_cannot_reproduce_are_refused(model_type, override, match):
    config = AutoConfig.for_model(model_type, **{**SMALL_COMMON, **FAMILIES[model_type].small, **override})
    with pytest.raises(PptkError, match=match):
        plan_pipeline(config, num_stages=2, attn_implementation=attn_for(model_type))


# Config fields the model-level code (<Family>Model, <Family>ForCausalLM) reads that the family module reproduces
# without the family table: the shape itself, masks, padding, tying, and fields read only for generation.
GENERIC_FIELDS = {
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "pad_token_id",
    "rms_norm_eps",
    "layer_norm_eps",
    "norm_epsilon",
    "layer_types",
    "sliding_window",
    "tie_word_embeddings",
    "get_text_config",
}
GENERATION_ONLY = {"phi3": {"original_max_position_embeddings"}}
# What a MoE family's ForCausalLM reads for the router loss; pptk.models.moe.router_loss_of reads the same fields.
ROUTER_LOSS_FIELDS = {"output_router_logits", "router_aux_loss_coef", "num_experts", "num_local_experts"}
ROUTER_LOSS_FIELDS |= {"num_experts_per_tok"}


@pytest.mark.parametrize("model_type", sorted(FAMILIES) + sorted(MOE_FAMILIES))
def test_family_table_covers_what_the_model_level_code_reads(model_type):
    """Guards a transformers upgrade: a new model-level behaviour in a registered family must reach the table."""
    config_class = CONFIG_MAPPING[model_type]
    read = set()
    for cls in (AutoModel._model_mapping[config_class], AutoModelForCausalLM._model_mapping[config_class]):
        read |= set(re.findall(r"config\.(\w+)", inspect.getsource(cls)))
    family = family_of(model_type)
    assert family is not None
    handled = GENERIC_FIELDS | GENERATION_ONLY.get(model_type, set()) | set(family.unsupported)
    handled |= ROUTER_LOSS_FIELDS if family.moe == "switch" else set()
    handled |= {family.embedding_multiplier, family.embedding_dropout} | {name for _, name in family.logits}
    assert read - handled == set()
