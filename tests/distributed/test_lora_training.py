# LoRA through a recipe (recipes/sft.py) on CPU ranks: only the adapters train and are checkpointed, the exported
# adapter loads in peft and gives the pipeline's logits, the merged export is peft's merge, a pp=2 checkpoint resumes
# at pp=1 on the same curve; and in bf16 (BF16_Optimizer, GPT-2's frozen tied embeddings on both stages) the same.
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import free_port, run_recipe

from pptk.data.demo_chat import demo_chat_tokenizer, demo_conversations

pytestmark = pytest.mark.dist

SEQ_LEN = 64
LORA = ["--lora-r", "8", "--lora-alpha", "32"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """A small LLaMA (GQA, untied) and a small GPT-2 (tied embeddings), both with a ChatML tokenizer, and chats."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    work = tmp_path_factory.mktemp("lora-models")
    tokenizer = demo_chat_tokenizer(work / "tokenizer")
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    gpt2 = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    dirs = {}
    for name, model in (("llama", LlamaForCausalLM(llama)), ("gpt2", GPT2LMHeadModel(gpt2))):
        dirs[name] = work / name
        model.save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    train = work / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in demo_conversations(96, seed=1)))
    return {**dirs, "train": train, "tokenizer": tokenizer}


def _args(models: dict, model: str, *extra: str) -> list[str]:
    return [
        *("--model", str(models[model]), "--train", str(models["train"])),  # no held-out set: no evaluation
        *("--seq-len", str(SEQ_LEN), "--micro-batch-size", "2", "--grad-accum-steps", "2", "--samples", "0"),
        *("--no-dropout", "--log-every", "1", "--eval-every", "1000", "--lr", "1e-2", "--warmup-steps", "1"),
        *LORA,
        *extra,
    ]


def _launch(recipe_args: list[str], out: Path, ranks: int = 2) -> None:
    run = run_recipe(
        "sft.py", recipe_args, output_dir=out, launcher=["--num_gpus", str(ranks), "--master_port", str(free_port())]
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def fp32_run(models, tmp_path_factory) -> Path:
    """pp=2, fp32: 4 steps saved at 2 and 4, then the adapter and the merged model exported."""
    out = tmp_path_factory.mktemp("lora-fp32")
    extra = ("--max-steps", "4", "--save-every", "2", "--export-adapter", str(out / "adapter"))
    _launch(_args(models, "llama", *extra, "--export-hf", str(out / "merged")), out)
    return out


@pytest.fixture(scope="module")
def bf16_run(models, tmp_path_factory) -> Path:
    """pp=2, the shipped bf16 config (BF16_Optimizer), GPT-2 with its tied embeddings frozen on both stages: 4 steps
    saved at 2 and 4, the adapter exported."""
    out = tmp_path_factory.mktemp("lora-bf16")
    extra = ("--ds-config", "bf16", "--max-steps", "4", "--save-every", "2", "--export-adapter", str(out / "adapter"))
    _launch(_args(models, "gpt2", *extra), out)
    return out


def _pipeline_with_adapters(base: Path, tag_dir: Path):
    """The checkpoint's adapters on a one-process pipeline of the base (adapters kept apart, not merged)."""
    from pptk.checkpoints.lora_convert import read_adapter_state
    from pptk.checkpoints.training import read_manifest
    from pptk.parallel.lora import apply_lora, settings_from_record
    from pptk.parallel.lora_export import load_adapter_state_dict
    from pptk.parallel.pipeline import build_sequential_module, plan_pipeline

    manifest = read_manifest(tag_dir)
    plan = plan_pipeline(base, num_stages=1, task="causal-lm", dropout=False)
    pipe = build_sequential_module(plan)
    apply_lora(pipe, plan, settings_from_record(manifest["lora"]))
    load_adapter_state_dict(pipe, plan, read_adapter_state(tag_dir, manifest))
    return pipe.eval()


def _ids(vocab: int):
    ids = torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def test_the_exported_adapter_loads_in_peft_and_gives_the_pipelines_logits(models, fp32_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert sorted(p.name for p in (fp32_run / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((fp32_run / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (8, 32, "CAUSAL_LM")
    assert config["base_model_name_or_path"] == str(models["llama"].resolve())
    base = AutoModelForCausalLM.from_pretrained(models["llama"]).eval()
    peft_model = PeftModel.from_pretrained(base, fp32_run / "adapter").eval()
    ids, mask = _ids(base.config.vocab_size)
    pipe = _pipeline_with_adapters(models["llama"], fp32_run / "checkpoints" / "step4")
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(pipe((ids, mask)), expected, rtol=0, atol=1e-5)
        unadapted = AutoModelForCausalLM.from_pretrained(models["llama"]).eval()(input_ids=ids).logits
    assert (expected - unadapted).abs().max() > 1e-2  # the adapters trained: they change the logits


def test_the_merged_export_is_pefts_merge_in_fp32(models, fp32_run):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(models["llama"])
    merged_by_peft = PeftModel.from_pretrained(base, fp32_run / "adapter").merge_and_unload().state_dict()
    exported = load_file(fp32_run / "merged" / "model.safetensors")
    assert set(exported) == set(merged_by_peft)
    for name, tensor in exported.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, merged_by_peft[name], rtol=0, atol=0, msg=name)
    merged = AutoModelForCausalLM.from_pretrained(fp32_run / "merged").eval()
    assert (fp32_run / "merged" / "tokenizer.json").is_file()
    ids, mask = _ids(merged.config.vocab_size)
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["llama"]), fp32_run / "adapter")
        expected = adapted.eval()(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-5)


def _adapter_numel(model: Path) -> int:
    from pptk.parallel.lora import LoraSettings
    from pptk.parallel.lora_plan import lora_parameters_per_layer
    from pptk.parallel.pipeline import plan_pipeline

    plan = plan_pipeline(model, num_stages=1, task="causal-lm")
    counts = lora_parameters_per_layer(plan.layers, LoraSettings(r=8, alpha=32.0), task="causal-lm")
    return sum(c.adapters for c in counts)


def _check_adapter_only(tag_dir: Path, model: Path, *, dtype: torch.dtype) -> dict:
    """The tag holds the manifest, RNG states and, per layer with adapters, their tensors and optimizer states."""
    from pptk.checkpoints.integrity import CHECKPOINT_BYTES_PER_PARAM, tag_bytes
    from pptk.parallel.pipeline import plan_pipeline

    names = sorted(p.name for p in tag_dir.iterdir())
    kinds = {name.split("_layer_")[0] if "_layer_" in name else name.rstrip("0123456789.pt") for name in names}
    assert kinds == {"lora", "optim", "pptk.json", "rng_rank"}, names
    manifest = json.loads((tag_dir / "pptk.json").read_text())
    assert manifest["base_model"] == str(model.resolve()) and manifest["lora"]["r"] == 8
    assert set(manifest["files"]) == set(names) - {"pptk.json"}  # each with its checksum
    tensors, optim = {}, {}
    for name in names:
        if name.startswith("lora_layer_"):
            layer = torch.load(tag_dir / name)
            states = torch.load(tag_dir / name.replace("lora_layer_", "optim_layer_"))
            assert set(layer) == set(states) and all(".lora_" in key for key in layer), sorted(layer)
            tensors |= {f"{name}:{key}": t for key, t in layer.items()}
            optim |= {f"{name}:{key}": s for key, s in states.items()}
    assert {t.dtype for t in tensors.values()} == {dtype}
    assert sum(t.numel() for t in tensors.values()) == _adapter_numel(model)  # every adapter, nothing else
    assert all(set(s) == {"fp32", "exp_avg", "exp_avg_sq"} for s in optim.values())
    plan = plan_pipeline(model, num_stages=1, task="causal-lm")
    full = sum(c.unique_params for c in plan.stages.costs) * CHECKPOINT_BYTES_PER_PARAM
    assert tag_bytes(tag_dir) < full / 4, (tag_bytes(tag_dir), full)
    return optim


def test_the_checkpoint_holds_only_the_adapters_and_their_optimizer_states(models, fp32_run):
    _check_adapter_only(fp32_run / "checkpoints" / "step4", models["llama"], dtype=torch.float32)


def test_a_pp2_checkpoint_resumes_at_pp1_on_the_same_curve(models, fp32_run, tmp_path):
    resumed = tmp_path / "resumed"
    args = _args(models, "llama", "--max-steps", "4", "--save-every", "100", "--pp", "1")
    _launch([*args, "--resume-from", str(fp32_run / "checkpoints" / "step2")], resumed, ranks=1)
    original, again = _losses(fp32_run), _losses(resumed)
    assert sorted(again) == [3, 4]
    for step in again:  # measured: bit for bit (the adapters' weights and Adam states are exact in the files)
        assert again[step] == pytest.approx(original[step], rel=1e-6), (original, again)


def test_bf16_trains_and_checkpoints_only_the_adapters_with_frozen_tied_embeddings(models, bf16_run):
    """What the engine test of test_lora_verify checked before, now through the recipe: under BF16_Optimizer every
    adapter moved between the two saves (their fp32 masters), the optimizer holds nothing else, the loss fell."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    first = _check_adapter_only(bf16_run / "checkpoints" / "step2", models["gpt2"], dtype=torch.bfloat16)
    last = _check_adapter_only(bf16_run / "checkpoints" / "step4", models["gpt2"], dtype=torch.bfloat16)
    assert set(first) == set(last)
    assert all(not torch.equal(first[key]["fp32"], last[key]["fp32"]) for key in first)
    losses = _losses(bf16_run)
    assert losses[4] < losses[1], losses
    # the bf16 adapter on the fp32 base: peft's logits are the pipeline's, on the same adapters
    base = AutoModelForCausalLM.from_pretrained(models["gpt2"]).eval()
    peft_model = PeftModel.from_pretrained(base, bf16_run / "adapter").eval()
    pipe = _pipeline_with_adapters(models["gpt2"], bf16_run / "checkpoints" / "step4")
    ids, mask = _ids(base.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(
            pipe((ids, mask)), peft_model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-5
        )


def test_pptk_convert_writes_the_same_adapter_and_merge_from_the_checkpoint(models, fp32_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from pptk.cli import main as pptk

    checkpoints = str(fp32_run / "checkpoints")
    assert pptk(["convert", "ds-to-adapter", checkpoints, str(tmp_path / "adapter")]) == 0
    assert pptk(["convert", "ds-to-hf", checkpoints, str(tmp_path / "merged"), "--base", str(models["llama"])]) == 0
    for name, file in (("adapter", "adapter_model.safetensors"), ("merged", "model.safetensors")):
        ours, the_runs = load_file(tmp_path / name / file), load_file(fp32_run / name / file)
        assert set(ours) == set(the_runs) and all(torch.equal(ours[k], the_runs[k]) for k in ours), name
    assert pptk(["convert", "ds-to-adapter", checkpoints, str(tmp_path / "adapter")]) == 2  # not empty: refused
    assert "adapter is not empty (adapter_config.json, adapter_model.safetensors)" in capsys.readouterr().err


def test_the_full_weight_readers_refuse_a_lora_checkpoint(fp32_run, tmp_path):
    """Its layer files hold adapters only: read as a model they would be garbage, so the readers say what to use."""
    from pptk.checkpoints.convert import ds_to_hf, load_sequential_from_checkpoint
    from pptk.errors import PptkError

    for read in (
        lambda: ds_to_hf(fp32_run / "checkpoints", tmp_path / "hf"),
        lambda: load_sequential_from_checkpoint(fp32_run / "checkpoints"),
    ):
        with pytest.raises(PptkError, match=r"holds LoRA adapters, not full weights: `pptk convert ds-to-hf` merges"):
            read()
    assert not (tmp_path / "hf").exists()
