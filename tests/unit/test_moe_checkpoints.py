# Mixture-of-experts checkpoints as transformers 5.23 writes them (one tensor per expert on disk, fused into 3-D
# expert tensors by its conversion mapping on load): read per stage, converted both ways, bitwise.
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pptk.checkpoints.convert import ds_to_hf, hf_to_ds, load_sequential_from_checkpoint
from pptk.checkpoints.layer_files import read_layer
from pptk.checkpoints.training import find_checkpoint, read_manifest
from pptk.models import get_family
from pptk.models.decoder_families import MOE_FAMILIES
from pptk.parallel.hf_weights import HFCheckpoint, hf_conversions, hf_names
from pptk.parallel.pipeline import build_sequential_module, plan_pipeline

EAGER_ONLY = {"gpt_oss"}  # attention sinks: no SDPA path in transformers
FUSED_ON_LOAD = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "flex_olmo", "deepseek_v3"}  # experts.N.* on disk


def save_hf(path, model_type):
    torch.manual_seed(0)
    config = get_family(model_type).small_config()
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return model


def disk_tensors(directory):
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("model_type", sorted(MOE_FAMILIES))
def test_stages_load_a_saved_moe_model_exactly_as_hugging_face_loads_it(tmp_path, model_type):
    save_hf(tmp_path, model_type)
    on_disk = disk_tensors(tmp_path)
    if model_type in FUSED_ON_LOAD:  # the case this is about: the names on disk are not the model's
        assert any(".experts.0." in name for name in on_disk)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    attn = "eager" if model_type in EAGER_ONLY else "sdpa"
    plan = plan_pipeline(tmp_path, num_stages=2, dropout=False, attn_implementation=attn)
    pipe = build_sequential_module(plan)
    hf_state = loaded.state_dict()
    names = hf_names(pipe, plan.layers)
    for key, tensor in pipe.state_dict().items():
        assert torch.equal(tensor, hf_state[names[key]]), names[key]
    tied = {"lm_head.weight"} if plan.config.tie_word_embeddings else set()
    assert set(names.values()) == set(hf_state) - tied
    ids = torch.randint(3, plan.config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    logits = pipe.eval()((ids, mask))
    logits = logits[0] if isinstance(logits, tuple) else logits
    hf_logits = loaded.eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, hf_logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_hf_to_ds_to_hf_is_bitwise_for_moe(tmp_path, model_type):
    model = save_hf(tmp_path / "hf", model_type)
    hf_to_ds(tmp_path / "hf", tmp_path / "ds", pp=2)
    # the layer files hold the fused 3-D expert tensors the model trains: a resume at another pp reads them as
    # it reads a dense model's (layer files do not depend on the stage count)
    tag_dir = find_checkpoint(tmp_path / "ds")
    manifest = read_manifest(tag_dir)
    block = next(layer for layer in manifest["layers"] if layer["hf_prefix"] == "model.layers.1.")
    fused = read_layer(tag_dir, manifest, block["index"])
    assert fused["mlp.experts.gate_up_proj"].dim() == 3
    torch.testing.assert_close(
        fused["mlp.experts.gate_up_proj"], model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"], rtol=0, atol=0
    )

    ds_to_hf(tmp_path / "ds", tmp_path / "out", max_shard_size="60KB")
    written, exported = disk_tensors(tmp_path / "hf"), disk_tensors(tmp_path / "out")
    assert sorted(written) == sorted(exported)  # what save_pretrained wrote: one tensor per expert
    assert any(".experts.3." in name for name in exported)
    assert all(torch.equal(written[k], exported[k]) for k in written)
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1  # really sharded

    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    original = model.state_dict()
    assert all(torch.equal(t, original[k]) for k, t in reloaded.state_dict().items())
    _, pipeline = load_sequential_from_checkpoint(tmp_path / "ds")
    ids = torch.randint(3, reloaded.config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    out = pipeline.eval()((ids, mask))
    torch.testing.assert_close(out[0], reloaded.eval()(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


def test_a_fused_tensor_is_read_through_transformers_conversion_and_shapes_come_without_data(tmp_path):
    model = save_hf(tmp_path, "qwen3_moe")
    plain = HFCheckpoint(tmp_path)
    checkpoint = HFCheckpoint(tmp_path, conversions=hf_conversions(type(model), model.config))
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert name not in plain and name in checkpoint
    assert checkpoint.shape(name) == (4, 64, 64)  # experts x (gate + up: 2 x 32) x hidden
    target = torch.empty(4, 64, 64, dtype=torch.bfloat16)
    checkpoint.read_into(name, target)  # cast on the way, like a bf16 stage
    assert torch.equal(target, model.state_dict()[name].bfloat16())
    assert hf_conversions(type(model), model.config) and not hf_conversions(
        type(AutoModelForCausalLM.from_config(get_family("llama").small_config())), get_family("llama").small_config()
    )
