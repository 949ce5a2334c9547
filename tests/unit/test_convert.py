# Hugging Face <-> pipeline checkpoint conversion in one process: bitwise round trips and clear errors.
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

from pptk.checkpoints.convert import ds_to_hf, hf_to_ds, load_sequential_from_checkpoint
from pptk.checkpoints.layer_files import load_rank_layer
from pptk.checkpoints.training import manifest_for, read_manifest, same_layout
from pptk.cli import main
from pptk.errors import PptkError
from pptk.models import get_family
from pptk.models.heads import hf_model_class
from pptk.parallel.layout import Layout
from pptk.parallel.pipeline import plan_pipeline, resolve_model
from pptk.parallel.tensor_parallel import shard_spec, shard_stage


def _save_hf(path, model_type, task="causal-lm", **overrides):
    config = get_family(model_type).small_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = hf_model_class(config, task)(config)
    model.save_pretrained(path)
    return model


def _tensors(directory):
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize(
    ("model_type", "task", "tied"),
    [("gpt2", "causal-lm", True), ("llama", "causal-lm", False), ("bert", "masked-lm", True)],
)
def test_hf_to_pipeline_to_hf_is_bitwise_identical(tmp_path, model_type, task, tied):
    model = _save_hf(tmp_path / "hf", model_type, task, tie_word_embeddings=tied)
    assert model.config.tie_word_embeddings is tied
    hf_to_ds(tmp_path / "hf", tmp_path / "ds", pp=2, task=task)
    ds_to_hf(tmp_path / "ds", tmp_path / "out", max_shard_size="40KB")
    original, exported = _tensors(tmp_path / "hf"), _tensors(tmp_path / "out")
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded

    auto = AutoModelForMaskedLM if task == "masked-lm" else AutoModelForCausalLM
    reloaded = auto.from_pretrained(tmp_path / "out").eval()
    _, pipeline = load_sequential_from_checkpoint(tmp_path / "ds")
    ids = torch.randint(1, reloaded.config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    inputs = (ids, mask, torch.zeros_like(ids)) if model_type == "bert" else (ids, mask)
    torch.testing.assert_close(
        reloaded(input_ids=ids, attention_mask=mask).logits, pipeline.eval()(inputs), rtol=0, atol=0
    )


def test_hf_to_ds_at_pp2_tp2_round_trips_bitwise_and_refuses_a_layout_the_model_cannot_split(tmp_path, capsys):
    model = _save_hf(tmp_path / "hf", "llama", "causal-lm")
    assert main(["convert", "hf-to-ds", str(tmp_path / "hf"), str(tmp_path / "ds"), "--pp", "2", "--tp", "2"]) == 0
    tag = tmp_path / "ds" / "step0"
    assert sorted(p.name for p in tag.glob("layer_01-*")) == [  # the first block: one file per tp rank
        "layer_01-model_00-model_states.pt",
        "layer_01-model_01-model_states.pt",
    ]
    q_proj = [torch.load(tag / f"layer_01-model_{r:02d}-model_states.pt")["self_attn.q_proj.weight"] for r in (0, 1)]
    full_q = model.model.layers[0].self_attn.q_proj.weight
    assert all(q.shape[0] == full_q.shape[0] // 2 for q in q_proj)  # each holds its half of the heads
    assert main(["convert", "ds-to-hf", str(tmp_path / "ds"), str(tmp_path / "out")]) == 0
    original, exported = _tensors(tmp_path / "hf"), _tensors(tmp_path / "out")
    assert sorted(original) == sorted(exported) and all(torch.equal(original[k], exported[k]) for k in original)
    _, merged = load_sequential_from_checkpoint(tmp_path / "ds")  # a tp=1 reader merges the slices
    assert torch.equal(merged.state_dict()["1.self_attn.q_proj.weight"], full_q)
    heads = model.config.num_attention_heads
    bad = ["convert", "hf-to-ds", str(tmp_path / "hf"), str(tmp_path / "ds3"), "--tp", str(heads + 1)]
    assert main(bad) == 2
    assert f"not divisible by tp({heads + 1})" in capsys.readouterr().err
    assert not (tmp_path / "ds3").exists()


def test_cli_convert_both_ways(tmp_path, capsys):
    _save_hf(tmp_path / "hf", "gpt2")
    assert main(["convert", "hf-to-ds", str(tmp_path / "hf"), str(tmp_path / "ds"), "--pp", "2"]) == 0
    assert (tmp_path / "ds" / "latest").read_text() == "step0"
    assert main(["convert", "ds-to-hf", str(tmp_path / "ds"), str(tmp_path / "out")]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    assert AutoConfig.from_pretrained(tmp_path / "out").architectures == ["GPT2LMHeadModel"]
    assert main(["convert", "hf-to-ds", str(tmp_path / "hf"), str(tmp_path / "ds")]) == 2  # never overwrites
    assert "already holds checkpoints" in capsys.readouterr().err


def test_bad_sources_get_clear_errors(tmp_path):
    _save_hf(tmp_path / "hf", "gpt2")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PptkError, match="corrupt or truncated"):
        hf_to_ds(tmp_path / "hf", tmp_path / "ds")
    (tmp_path / "plain").mkdir()
    with pytest.raises(PptkError, match="neither a pptk checkpoint tag"):
        ds_to_hf(tmp_path / "plain", tmp_path / "out")
    _save_hf(tmp_path / "hf2", "gpt2")
    with pytest.raises(PptkError, match="pp=9 stages but the model has only 4 blocks"):
        hf_to_ds(tmp_path / "hf2", tmp_path / "ds2", pp=9)


def test_a_missing_layer_file_is_named(tmp_path):
    _save_hf(tmp_path / "hf", "gpt2")
    tag = hf_to_ds(tmp_path / "hf", tmp_path / "ds")
    (tag / "layer_03-model_states.pt").unlink()
    with pytest.raises(PptkError, match="checkpoint step0 .* is damaged: layer_03-model_states.pt is missing; use"):
        ds_to_hf(tmp_path / "ds", tmp_path / "out")


def test_resume_refuses_another_model_or_global_batch():
    gpt2 = plan_pipeline("gpt2", num_stages=2)
    layout = Layout(pp=2, dp=1, micro_batch_size=4, grad_accum_steps=4)
    manifest = json.loads(json.dumps(manifest_for(gpt2, step=10, layout=layout)))
    assert same_layout(manifest, gpt2, layout)
    assert not same_layout(manifest, gpt2, Layout(pp=1, dp=2, micro_batch_size=4, grad_accum_steps=2))
    with pytest.raises(PptkError, match="global batch of 16, this run uses 32.*--global-batch-size 16"):
        same_layout(manifest, gpt2, Layout(pp=2, dp=1, micro_batch_size=4, grad_accum_steps=8))
    with pytest.raises(PptkError, match="model type 'gpt2' vs 'llama'"):
        same_layout(manifest, plan_pipeline("llama", num_stages=2), layout)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_tp2_checkpoint_fills_every_ranks_slice_at_any_tp(tmp_path, tp):
    """The per-tp-rank layer files of a tp=2 checkpoint, read at tp 2 (each rank its own file), 1 and 4 (merged and
    cut again): every rank of a GPT-2 block gets exactly its slice of Hugging Face's tensors (c_attn per head)."""
    model = _save_hf(tmp_path / "hf", "gpt2")
    hf_to_ds(tmp_path / "hf", tmp_path / "ds", tp=2)
    tag = tmp_path / "ds" / "step0"
    manifest = read_manifest(tag)
    plan = plan_pipeline(resolve_model(tmp_path / "hf"), num_stages=1)
    index = next(i for i, layer in enumerate(plan.layers) if layer.role == "block")
    full = model.state_dict()
    for rank in range(tp):
        layer = plan.layers[index].spec.build()
        shard_stage(layer, group=None, rank=rank, size=tp)
        load_rank_layer(layer, tag, manifest, index, tp_rank=rank, tp=tp)
        for name, param in layer.named_parameters():
            expected = full[plan.layers[index].hf_prefix + name]
            spec = shard_spec(param)
            assert torch.equal(param, spec.take(expected) if spec else expected), (rank, name)
