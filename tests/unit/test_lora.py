# LoRA on pipeline stages, in one process: the same adapters as peft on the Hugging Face model (loss, logits,
# gradients), peft's files and names, merging, gradients across a frozen first stage, and the refusals.
from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from pptk.errors import PptkError
from pptk.models import get_family, supported_model_types
from pptk.models.decoder_families import FAMILIES
from pptk.parallel.hf_weights import hf_names
from pptk.parallel.layout import Layout
from pptk.parallel.lora import (
    LoraSettings,
    apply_lora,
    check_lora_layout,
    is_lora_layer,
    resolve_lora_targets,
)
from pptk.parallel.lora_export import (
    ADAPTER_CONFIG,
    PEFT_PREFIX,
    adapter_state_dict,
    load_adapter_state_dict,
    merge_lora,
    write_adapter_dir,
)
from pptk.parallel.pipeline import build_sequential_module, plan_pipeline

SEQ_LEN = 16
BERT_TARGETS = ("query", "key", "value", "dense")
# model type -> (task, pptk settings, the same request to peft on the Hugging Face model). The decoders use both sides'
# own "all-linear", so pptk's default is checked against peft's reading of it; peft's "all-linear" would put an
# adapter on BERT's token-classification head (and then fail to train it in full), so BERT names its targets.
CASES = {
    "gpt2": ("causal-lm", LoraSettings(r=4, alpha=8.0), dict(target_modules="all-linear")),
    "llama": ("causal-lm", LoraSettings(r=4, alpha=8.0), dict(target_modules="all-linear")),
    "qwen3": ("causal-lm", LoraSettings(r=4, alpha=8.0), dict(target_modules="all-linear")),
    "bert": (
        "token-classification",
        LoraSettings(r=4, alpha=8.0, target_modules=BERT_TARGETS),
        dict(target_modules=list(BERT_TARGETS), task_type="TOKEN_CLS"),
    ),
}


def _batch(plan, *, seed: int = 0):
    """Right-padded rows (16, 11, 6 tokens); labels of the task, -100 on padding."""
    gen = torch.Generator().manual_seed(seed)
    config = plan.config
    ids = torch.randint(3, config.vocab_size, (3, SEQ_LEN), generator=gen)
    mask = (torch.arange(SEQ_LEN)[None, :] < torch.tensor([SEQ_LEN, 11, 6])[:, None]).long()
    ids = ids.masked_fill(mask == 0, config.pad_token_id or 0)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if plan.config.model_type == "bert":
        inputs["token_type_ids"] = (torch.arange(SEQ_LEN)[None, :] >= 5).long().expand(3, -1) * mask
        labels = torch.randint(0, config.num_labels, ids.shape, generator=gen)
    else:
        labels = ids.clone()
    return inputs, labels.masked_fill(mask == 0, -100)


def _pipe_call(pipe, inputs):
    return pipe(tuple(inputs.values()))


def _models(model_type: str, tmp_path):
    """A random Hugging Face model saved to disk, the pipeline loaded from it, and a fresh copy of the HF model."""
    task, _, _ = CASES[model_type]
    plan = plan_pipeline(get_family(model_type).small_config(), num_stages=1, task=task, dropout=False)
    torch.manual_seed(0)
    plan.hf_class(plan.config).save_pretrained(tmp_path / "base")
    plan = plan_pipeline(tmp_path / "base", num_stages=1, task=task, dropout=False)
    hf = plan.hf_class.from_pretrained(tmp_path / "base", config=plan.config)
    return plan, build_sequential_module(plan), hf


@torch.no_grad()
def _randomise_adapters(pipe, *, seed: int = 1) -> None:
    """Adapters with B != 0 (peft starts B at zero, which would hide a wrong A or scaling)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in pipe.named_parameters():
        if ".lora_" in name:
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _lora_pair(model_type: str, tmp_path):
    """The pipeline with LoRA and random adapters, and peft's model of the same HF weights with the same adapters."""
    _, settings, peft_request = CASES[model_type]
    plan, pipe, hf = _models(model_type, tmp_path)
    targets = apply_lora(pipe, plan, settings)
    _randomise_adapters(pipe)
    peft_model = get_peft_model(hf, LoraConfig(r=settings.r, lora_alpha=settings.alpha, **peft_request))
    loaded = set_peft_model_state_dict(peft_model, adapter_state_dict(pipe, plan))  # peft's own loader and keys
    assert not loaded.unexpected_keys
    return plan, pipe, peft_model, targets, settings


def _peft_names(pipe, plan, targets) -> dict[str, str]:
    """Pipeline parameter key -> the peft model's parameter name (adapters and modules trained in full)."""
    names = {}
    for key, hf_name in hf_names(pipe, plan.layers).items():
        module, _, leaf = hf_name.rpartition(".")
        saved = module in targets.trained_in_full
        names[key] = PEFT_PREFIX + (f"{module}.modules_to_save.default.{leaf}" if saved else hf_name)
    return names


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_type", list(CASES))
def test_pipeline_lora_equals_peft_on_hugging_face(model_type, tmp_path):
    plan, pipe, peft_model, targets, settings = _lora_pair(model_type, tmp_path)
    if model_type == "llama":
        assert plan.config.num_key_value_heads < plan.config.num_attention_heads  # grouped-query attention
    names = _peft_names(pipe, plan, targets)

    # the same parameters train: adapters, plus BERT's token-classification head in full, nothing else
    assert {names[k] for k in _trainable(pipe)} == set(_trainable(peft_model))
    assert all(".lora_" in k for k in _trainable(pipe)) == (model_type != "bert")
    assert targets.trained_in_full == ({"classifier"} if model_type == "bert" else set())
    if model_type == "gpt2":
        assert targets.describe() == (
            "LoRA adapters on 16 modules (transformer.h.N.attn.c_attn, transformer.h.N.attn.c_proj, "
            "transformer.h.N.mlp.c_fc, transformer.h.N.mlp.c_proj)"
        )
    # adapter_state_dict is keyed and valued as peft saves the adapter
    ours, theirs = adapter_state_dict(pipe, plan), get_peft_model_state_dict(peft_model)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    inputs, labels = _batch(plan)
    pipe.train()
    peft_model.train()
    expected = peft_model(**inputs, labels=labels)
    logits = _pipe_call(pipe, inputs)
    loss = plan.loss_fn()(logits, labels)
    torch.testing.assert_close(logits, expected.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, expected.loss, rtol=1e-6, atol=0)

    loss.backward()
    expected.loss.backward()
    theirs_params = dict(peft_model.named_parameters())
    for key, param in _trainable(pipe).items():
        torch.testing.assert_close(param.grad, theirs_params[names[key]].grad, rtol=1e-5, atol=1e-6, msg=key)
    assert all(p.grad is None for p in pipe.parameters() if not p.requires_grad)

    frozen = {k: p.detach().clone() for k, p in pipe.named_parameters() if not p.requires_grad}
    adapters = {k: p.detach().clone() for k, p in _trainable(pipe).items()}
    torch.optim.AdamW(_trainable(pipe).values(), lr=1e-2).step()
    assert all(torch.equal(p, frozen[k]) for k, p in pipe.named_parameters() if k in frozen)
    assert all(not torch.equal(p, adapters[k]) for k, p in _trainable(pipe).items())
    assert settings.scaling == 2.0


# bf16: both sides run the same Hugging Face modules and peft LoRA layers in bf16. GPT-2 comes out bit for bit; LLaMA
# differs in the rotary tables (Hugging Face casts inv_freq to bf16 with the model, pptk keeps it fp32) and BERT in
# the loss (pptk's loss upcasts the logits). Tolerances: logits 0.05 absolute (logits of size ~1.5), loss 1e-2
# relative, each adapter gradient within 5% of its largest entry (measured: at most 3.6%).
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert"])
def test_bf16_lora_equals_peft_within_bf16_tolerance(model_type, tmp_path):
    plan, pipe, peft_model, targets, _ = _lora_pair(model_type, tmp_path)
    pipe.to(torch.bfloat16).train()
    peft_model.to(torch.bfloat16).train()
    names = _peft_names(pipe, plan, targets)
    inputs, labels = _batch(plan)
    expected = peft_model(**inputs, labels=labels)
    logits = _pipe_call(pipe, inputs)
    loss = plan.loss_fn()(logits, labels)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, expected.logits, rtol=0, atol=5e-2)
    torch.testing.assert_close(loss.float(), expected.loss.float(), rtol=1e-2, atol=0)
    loss.backward()
    expected.loss.backward()
    theirs = dict(peft_model.named_parameters())
    for key, param in _trainable(pipe).items():
        assert param.dtype == torch.bfloat16
        reference = theirs[names[key]].grad.float()
        worst = (param.grad.float() - reference).abs().max()
        assert worst <= 0.05 * reference.abs().max(), f"{key}: {worst} vs largest {reference.abs().max()}"
        assert reference.abs().max() > 0


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_written_adapter_dir_loads_in_peft_and_gives_the_pipeline_logits(model_type, tmp_path):
    plan, pipe, _, targets, settings = _lora_pair(model_type, tmp_path)
    out = write_adapter_dir(adapter_state_dict(pipe, plan), settings, plan.config, tmp_path / "adapter", task=plan.task)
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == sorted(targets.adapted)
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (4, 8.0, targets.task_type)
    assert config["base_model_name_or_path"] == str(tmp_path / "base")

    fresh = plan.hf_class.from_pretrained(tmp_path / "base", config=plan.config)
    loaded = PeftModel.from_pretrained(fresh, out).eval()
    inputs, _ = _batch(plan, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(_pipe_call(pipe.eval(), inputs), loaded(**inputs).logits, rtol=0, atol=1e-5)

    # and back into another pipeline (what a resumed or pp=2 run does with the same file)
    _, other, _ = _models(model_type, tmp_path / "again")
    apply_lora(other, plan, settings)
    from safetensors.torch import load_file

    load_adapter_state_dict(other, plan, load_file(out / "adapter_model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(_pipe_call(other.eval(), inputs), _pipe_call(pipe, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])  # Conv1D [in, out] and nn.Linear [out, in]
def test_merged_weights_are_base_plus_b_a_times_scaling_in_fp32(model_type, tmp_path):
    plan, pipe, peft_model, targets, settings = _lora_pair(model_type, tmp_path)
    inputs, _ = _batch(plan)
    pipe.eval()
    with torch.no_grad():
        before = _pipe_call(pipe, inputs)
    expected = {}
    for name, layer in pipe.named_modules():
        if is_lora_layer(layer):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            delta = (b.double() @ a.double()) * (settings.alpha / settings.r)
            base = layer.get_base_layer().weight.double()
            expected[name] = base + (delta.T if model_type == "gpt2" else delta)

    merged = merge_lora(pipe, plan)

    assert sorted(merged) == sorted(targets.adapted)
    assert not any(is_lora_layer(m) for m in pipe.modules())
    params = dict(pipe.named_parameters())
    for name, weight in expected.items():
        torch.testing.assert_close(params[f"{name}.weight"].double(), weight, rtol=0, atol=1e-6)
    # the plain names are back, with peft's own merge of the same adapters
    reference = peft_model.merge_and_unload().state_dict()
    for key, hf_name in hf_names(pipe, plan.layers).items():
        torch.testing.assert_close(pipe.state_dict()[key], reference[hf_name], rtol=0, atol=1e-6, msg=hf_name)
    with torch.no_grad():
        torch.testing.assert_close(_pipe_call(pipe, inputs), before, rtol=0, atol=1e-5)


def test_gradients_cross_a_frozen_first_stage_as_deepspeed_sends_them(tmp_path):
    """Stage 0 holds only the (frozen) embeddings; DeepSpeed runs its backward as output.backward(received grad)."""
    plan, pipe, peft_model, _, _ = _lora_pair("gpt2", tmp_path)
    first = sum(layer.role == "embed" for layer in plan.layers)
    stage0, stage1 = pipe.forward_funcs[:first], pipe.forward_funcs[first:]
    inputs, labels = _batch(plan)

    def run(funcs, x):
        for func in funcs:
            x = func(x)
        return x

    # without apply_lora's fix, a frozen embedding's output has no grad and stage 0's backward fails
    control = build_sequential_module(plan).requires_grad_(False)
    frozen_output = run(control.forward_funcs[:first], tuple(inputs.values()))[0]
    with pytest.raises(RuntimeError, match="does not require grad"):
        frozen_output.backward(torch.ones_like(frozen_output))

    assert not any(p.requires_grad for layer in stage0 for p in layer.parameters())
    sent = run(stage0, tuple(inputs.values()))
    assert sent[0].requires_grad
    received = tuple(t.detach().clone().requires_grad_(t.is_floating_point()) for t in sent)  # the next stage's recv
    loss = plan.loss_fn()(run(stage1, received), labels)
    loss.backward()
    for output, buffer in zip(sent, received):
        if output.is_floating_point():
            output.backward(gradient=buffer.grad)  # what _exec_backward_pass does on stage 0

    expected = peft_model(**inputs, labels=labels)
    expected.loss.backward()
    torch.testing.assert_close(loss, expected.loss, rtol=1e-6, atol=0)
    names = _peft_names(pipe, plan, resolve_lora_targets(plan.layers, CASES["gpt2"][1], task=plan.task))
    theirs = dict(peft_model.named_parameters())
    for key, param in _trainable(pipe).items():
        torch.testing.assert_close(param.grad, theirs[names[key]].grad, rtol=1e-5, atol=1e-6, msg=key)


def test_each_stage_gets_its_own_adapters_and_an_embedding_stage_only_a_placeholder(tmp_path):
    """Stages built apart (embeddings | the rest) get the same adapters as one whole stage: seeded per layer."""
    plan, whole, _ = _models("llama", tmp_path)
    settings = CASES["llama"][1]
    apply_lora(whole, plan, settings)
    first = sum(layer.role == "embed" for layer in plan.layers)
    stages = []
    for indices in (range(first), range(first, len(plan.layers))):
        stage = nn.Module()  # a PipelineModule stage's layout: "{index}.*" and "tied_modules.{key}.*"
        stage.tied_modules = nn.ModuleDict()
        for index in indices:
            layer = plan.layers[index]
            if layer.tied_key:
                stage.tied_modules[layer.tied_key] = layer.spec.build()
            else:
                stage.add_module(str(index), layer.spec.build())
        apply_lora(stage, plan, settings)
        stages.append(stage)
    # the embedding stage: nothing to train but a zero placeholder that DeepSpeed's optimizers can step
    placeholder = stages[0].tied_modules.word_embeddings.pptk_lora_placeholder
    assert _trainable(stages[0]) == {"tied_modules.word_embeddings.pptk_lora_placeholder": placeholder}
    assert placeholder.item() == 0 and adapter_state_dict(stages[0], plan) == {}
    inputs, _ = _batch(plan)
    embeddings = stages[0].tied_modules.word_embeddings
    sent = embeddings(tuple(inputs.values()))
    assert torch.equal(sent[0], embeddings.weight[inputs["input_ids"]])  # x + 0 * placeholder is x
    sent[0].backward(torch.randn(sent[0].shape))
    assert placeholder.grad is not None and placeholder.grad.item() == 0
    assert merge_lora(stages[0], plan) == [] and not _trainable(stages[0])

    staged = adapter_state_dict(stages[1], plan)
    assert staged.keys() == adapter_state_dict(whole, plan).keys()
    assert all(torch.equal(staged[k], v) for k, v in adapter_state_dict(whole, plan).items())
    assert any(k.endswith("lora_A.weight") and v.abs().sum() > 0 for k, v in staged.items())


@pytest.mark.parametrize("model_type", sorted(set(FAMILIES) & set(supported_model_types())))
def test_default_targets_are_the_block_linears_of_every_decoder_family(model_type):
    # eager: some families (soft-capping) have no sdpa path; the kernel does not change the modules
    plan = plan_pipeline(get_family(model_type).small_config(), num_stages=1, attn_implementation="eager")
    targets = resolve_lora_targets(plan.layers, LoraSettings(), task=plan.task)
    blocks = tuple(layer.hf_prefix for layer in plan.layers if layer.role == "block")
    assert targets.adapted and all(name.startswith(blocks) for name in targets.adapted)
    assert len(targets.adapted) % plan.config.num_hidden_layers == 0  # the same projections in every block
    assert not targets.trained_in_full


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(r=0), r"r \(the adapter rank\) must be a positive integer, got 0"),
        (dict(r=-2), "got -2"),
        (dict(r=4.0), "got 4.0"),
        (dict(alpha=0), r"alpha must be a finite number > 0 \(scaling = alpha / r\), got 0"),
        (dict(alpha=math.nan), "got nan"),
        (dict(dropout=1.0), "dropout must be a finite number with 0 <= dropout < 1, got 1.0"),
        (dict(dropout=-0.1), "got -0.1"),
        (dict(target_modules=[]), "target_modules is an empty list"),
        (dict(target_modules="q_proj("), "is not a valid regular expression"),
        (dict(modules_to_save=("",)), "modules_to_save must be a list of non-empty module names"),
    ],
)
def test_bad_settings_are_refused_with_one_clear_error(kwargs, message):
    with pytest.raises(PptkError, match=message):
        LoraSettings(**kwargs)


def test_lists_become_tuples_and_settings_stay_frozen():
    settings = LoraSettings(target_modules=["q_proj", "v_proj"], modules_to_save=["score"])
    assert settings.target_modules == ("q_proj", "v_proj") and settings.modules_to_save == ("score",)
    with pytest.raises(AttributeError):
        settings.r = 2  # type: ignore[misc]


def _llama_plan():
    return plan_pipeline(get_family("llama").small_config(), num_stages=1)


def test_a_target_matching_nothing_names_the_pattern_and_the_linear_layers():
    plan = _llama_plan()
    with pytest.raises(PptkError, match=r"'q_porj' matches no module .* model\.layers\.N\.self_attn\.q_proj"):
        resolve_lora_targets(plan.layers, LoraSettings(target_modules=("v_proj", "q_porj")), task=plan.task)
    with pytest.raises(PptkError, match=r"'.*\\.ffn\\..*' matches no module"):  # a regex full-matches a whole name
        resolve_lora_targets(plan.layers, LoraSettings(target_modules=r".*\.ffn\..*"), task=plan.task)


def test_modules_lora_cannot_wrap_are_refused():
    plan = _llama_plan()
    with pytest.raises(PptkError, match=r"input_layernorm \(LlamaRMSNorm\); pptk puts adapters on linear layers"):
        resolve_lora_targets(plan.layers, LoraSettings(target_modules=("input_layernorm",)), task=plan.task)
    with pytest.raises(PptkError, match=r"model\.embed_tokens .*tied"):
        resolve_lora_targets(plan.layers, LoraSettings(target_modules=r"model\.embed_tokens"), task=plan.task)
    with pytest.raises(PptkError, match="modules_to_save 'pooler' matches no module"):
        resolve_lora_targets(plan.layers, LoraSettings(modules_to_save=("pooler",)), task=plan.task)
    bert = plan_pipeline(get_family("bert").small_config(), num_stages=1, task="token-classification")
    with pytest.raises(PptkError, match="whole pipeline layer .* modules_to_save"):
        resolve_lora_targets(bert.layers, LoraSettings(target_modules=("query", "classifier")), task="masked-lm")


def test_tensor_parallel_layouts_are_refused_for_now():
    check_lora_layout(Layout(pp=2, dp=1, micro_batch_size=1, grad_accum_steps=4))
    with pytest.raises(PptkError, match=r"LoRA with tp\(2\) > 1 is not supported yet"):
        check_lora_layout(Layout(pp=1, dp=1, tp=2, micro_batch_size=1, grad_accum_steps=1))


def test_applying_twice_and_writing_a_mismatched_adapter_are_refused(tmp_path):
    plan, pipe, _ = _models("gpt2", tmp_path)
    settings = CASES["gpt2"][1]
    apply_lora(pipe, plan, settings)
    with pytest.raises(PptkError, match="called twice"):
        apply_lora(pipe, plan, settings)
    state = adapter_state_dict(pipe, plan)
    with pytest.raises(PptkError, match="rank 4/4, settings say r=8"):
        write_adapter_dir(state, LoraSettings(r=8), plan.config, tmp_path / "a", task=plan.task)
    with pytest.raises(PptkError, match="state dict is empty"):
        write_adapter_dir({}, settings, plan.config, tmp_path / "a", task=plan.task)


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])  # Conv1D adapters; a head trained in full
def test_the_plan_counts_per_layer_what_apply_lora_adds_and_trains(model_type, tmp_path):
    from pptk.parallel.lora_plan import lora_parameters_per_layer
    from pptk.parallel.pipeline import local_layers

    plan, pipe, _ = _models(model_type, tmp_path)
    settings = CASES[model_type][1]
    counts = lora_parameters_per_layer(plan.layers, settings, task=plan.task)
    apply_lora(pipe, plan, settings)
    measured = {}
    for index, layer in local_layers(pipe, plan.layers):
        params = dict(layer.named_parameters())
        adapters = sum(p.numel() for name, p in params.items() if ".lora_" in name)
        measured[index] = (adapters, sum(p.numel() for p in params.values() if p.requires_grad) - adapters)
    assert {index: (c.adapters, c.trained_in_full) for index, c in enumerate(counts) if index in measured} == measured
    assert sum(c.adapters for c in counts) > 0
    assert sum(c.trained_in_full for c in counts) == (64 * 3 + 3 if model_type == "bert" else 0)


def test_a_run_config_with_lora_refuses_tensor_parallelism_in_its_one_error(tmp_path):
    from pptk.tasks.causal_lm import CausalLMData
    from pptk.training.config import ModelConfig, OptimConfig, OutputConfig, ParallelConfig, RunConfig

    def run(**fields):
        output = OutputConfig(output_dir=tmp_path)
        return RunConfig(model=ModelConfig(model="gpt2"), data=CausalLMData(), output=output, **fields)

    assert run(lora=LoraSettings(r=4)).to_dict()["lora"] == {
        "r": 4,
        "alpha": 16.0,
        "dropout": 0.0,
        "target_modules": "all-linear",
        "modules_to_save": [],
    }
    with pytest.raises(PptkError, match=r"--lr must be .*; LoRA with tp\(2\) > 1 is not supported yet"):
        run(lora=LoraSettings(r=4), parallel=ParallelConfig(tp=2), optim=OptimConfig(lr=0.0))
    with pytest.raises(PptkError, match="lora must be a LoraSettings or None, got dict"):
        run(lora={"r": 4})


def test_verify_fails_a_lora_step_that_moves_a_frozen_weight_or_no_adapter(tmp_path):
    """pptk verify's comparison on the real peft reference step, reported back as a perfect pipeline would report
    it, then with a frozen weight nudged, then as a step that moved nothing (what B = 0 adapters would give)."""
    from pptk.verify.compare import compare
    from pptk.verify.reference import reference_step

    plan = plan_pipeline(get_family("gpt2").small_config(), num_stages=1, dropout=False)
    reference = reference_step(
        plan,
        work=tmp_path,
        dp=1,
        precision="fp32",
        accum=torch.float32,
        micro_batch_size=2,
        micro_batch_count=1,
        seq_len=8,
        seed=0,
        lora=LoraSettings(r=4),
    )

    def check(params, ref=reference):
        result = {"loss": ref["loss"], "stage": 0, "dp_rank": 0, "params": params, "owned": list(params)}
        lora = {"r": 4, "alpha": 16.0}
        return compare(
            plan,
            ref,
            [result],
            model="gpt2",
            pp=1,
            dp=1,
            zero_stage=1,
            precision="fp32",
            tolerance=1e-5,
            top=3,
            lora=lora,
        )

    perfect = check(dict(reference["params"]))
    assert perfect.passed, perfect.describe()
    assert perfect.params_pipeline == perfect.params_reference and perfect.largest_update > 0
    assert "transformer.h.0.mlp.c_fc.weight" in reference["frozen"]  # the base weight, under its plain name
    assert f"{PEFT_PREFIX}transformer.h.0.mlp.c_fc.lora_A.weight" in reference["params"]

    nudged = dict(reference["params"])
    nudged["transformer.h.0.mlp.c_fc.weight"] = nudged["transformer.h.0.mlp.c_fc.weight"] + 1e-3
    assert check(nudged).problems == [
        "frozen weight transformer.h.0.mlp.c_fc.weight differs from Hugging Face's by 1.00e-03 after the step; with "
        "LoRA only the adapters and modules_to_save may change"
    ]
    still = check(dict(reference["start"]), reference | {"params": dict(reference["start"])})
    assert len(still.problems) == 1 and "32 trained tensor(s) did not change in the step" in still.problems[0]


def _lora_run(tmp_path, *flags: str):
    """A recipe's RunConfig from its shared flags (pptk.cli.run_flags), as gpt_pretrain.py builds it."""
    import argparse

    from pptk.cli.run_flags import add_run_flags, run_config
    from pptk.tasks.causal_lm import CausalLMData

    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    args = parser.parse_args(["--output-dir", str(tmp_path / "run"), "--pp", "1", *flags])
    return run_config(args, data=CausalLMData(), task="causal-lm")


def _fit_until_ranks(run):
    """The trainer's start-up up to the process group, on a small LLaMA: a run whose checks pass reaches
    init_distributed, which has no launcher here and fails otherwise (so a PptkError below came first)."""
    from types import SimpleNamespace

    from pptk.parallel.pipeline import resolve_model
    from pptk.training.trainer import Trainer

    task = SimpleNamespace(
        task="causal-lm", source=resolve_model(get_family("llama").small_config()), seq_len=16, num_train_examples=64
    )
    return Trainer(run, prepare=lambda run: task)._fit()


def test_recipe_flags_become_the_runs_lora_settings(tmp_path):
    run = _lora_run(tmp_path, "--lora-r", "4", "--lora-alpha", "8", "--lora-target-modules", "q_proj", "v_proj")
    assert run.lora == LoraSettings(r=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    assert _lora_run(tmp_path).lora is None
    regex = _lora_run(tmp_path, "--lora-r", "2", "--lora-target-modules", r".*\.(q|v)_proj", "--lora-dropout", "0.1")
    assert regex.lora.target_modules == r".*\.(q|v)_proj" and regex.lora.dropout == 0.1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora-r", "0"], "--lora-r must be an integer >= 1, got 0"),
        (["--lora-alpha", "8"], "--lora-alpha without --lora-r"),
        (["--export-adapter", "x"], "--export-adapter writes LoRA adapters: give --lora-r too"),
        (["--lora-r", "4", "--tp", "2"], r"LoRA with tp\(2\) > 1 is not supported yet"),
    ],
)
def test_bad_lora_flags_fail_when_the_run_is_built(tmp_path, flags, message):
    with pytest.raises(PptkError, match=message):
        _lora_run(tmp_path, *flags)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora-target-modules", "q_porj"], r"'q_porj' matches no module of this model; its linear layers are"),
        (["--lora-target-modules", "input_layernorm"], "pptk puts adapters on linear layers only"),
        (["--lora-target-modules", r"model\.embed_tokens"], "model.embed_tokens .*the word embeddings that a tied LM"),
        (["--lora-modules-to-save", "pooler"], "modules_to_save 'pooler' matches no module"),
    ],
)
def test_lora_a_model_cannot_take_fails_before_any_rank_starts(tmp_path, flags, message):
    with pytest.raises(PptkError, match=message):
        _fit_until_ranks(_lora_run(tmp_path, "--lora-r", "4", *flags))


def test_an_adapter_export_over_a_non_empty_directory_fails_before_any_rank_starts(tmp_path):
    from pptk.checkpoints.lora_convert import check_adapter_destination

    taken = tmp_path / "adapter"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(PptkError, match=r"adapter is not empty \(notes.txt\); the adapter export writes into a new"):
        _fit_until_ranks(_lora_run(tmp_path, "--lora-r", "4", "--export-adapter", str(taken)))
    check_adapter_destination(tmp_path / "new")  # new or empty: fine
    check_adapter_destination(tmp_path / "run")


def test_a_resume_must_keep_the_lora_settings_the_base_and_the_kind_of_checkpoint(tmp_path):
    from pptk.checkpoints.lora_checkpoint import check_lora_resume, lora_manifest_entries

    plan = _llama_plan()
    settings = LoraSettings(r=4)
    manifest = {**lora_manifest_entries(settings, plan), "run_config": {"seed": 7}}
    check_lora_resume(manifest, settings, plan, seed=7)
    check_lora_resume({}, None, plan, seed=7)  # a full checkpoint, resumed in full
    with pytest.raises(PptkError, match="trained with --lora-r 4 .*this run asks for --lora-r 8"):
        check_lora_resume(manifest, LoraSettings(r=8), plan, seed=7)
    with pytest.raises(PptkError, match="holds full weights, not LoRA adapters.*pptk convert ds-to-hf"):
        check_lora_resume({}, settings, plan, seed=7)
    with pytest.raises(PptkError, match="holds LoRA adapters .* resume it with those flags"):
        check_lora_resume(manifest, None, plan, seed=7)
    with pytest.raises(PptkError, match="initialised from --seed 7 .*resume with --seed 7"):
        check_lora_resume(manifest, settings, plan, seed=8)
    elsewhere = {**manifest, "base_model": "/models/other"}
    with pytest.raises(PptkError, match="trained on the base model /models/other; .*Resume with --model /models/other"):
        check_lora_resume(elsewhere, settings, plan, seed=7)
