# Tensor parallelism against Hugging Face: launches of 4 gloo ranks (pp=2 x tp=2; pp=1 x tp=2 x dp=2) and of 2
# (tp=2 alone) check the jobs below; then a checkpoint of a tp=1 run is resumed at tp=2 (each rank cuts its slices)
# and exported from its per-tp-rank layer files, and that tp=2 x pp=1 run's checkpoint is resumed at tp=1 x pp=2
# (the slices merged).
import json

import pytest
import torch
from conftest import free_port, run_recipe
from transformers import AutoModelForCausalLM

from pptk.checkpoints.layer_files import optim_file, read_layer, read_optimizer_states
from pptk.models.decoder_families import FAMILIES, MOE_FAMILIES
from pptk.parallel.tensor_parallel import TP_REFUSED

pytestmark = pytest.mark.dist

TP_DECODERS = [name for name in FAMILIES if name not in TP_REFUSED]
EAGER_ONLY = {"gemma2", "vaultgemma"}  # attention soft-capping: transformers has no SDPA path for them

# Causal LMs split their embedding, LM head and loss by vocabulary at tp > 1 (pptk.parallel.vocab_parallel): every
# causal-lm job below runs that way, the tied GPT-2 and the untied LLaMA also with a vocabulary tp does not divide
# (padded, the padding masked out of the loss and cut from every merge); "llama-replicated" keeps it whole.
JOBS = {  # name -> (model, task, precision)
    "gpt2": ("gpt2", None, "fp32"),  # tied embedding / LM head across the stages; c_attn's fused q|k|v split per head
    "llama": ("llama", None, "fp32"),  # grouped-query attention: 4 heads, 2 key/value heads, one of each per rank
    "qwen3": ("qwen3", None, "fp32"),  # per-head q/k norms: replicated weights, gradients summed over the tp ranks
    "mistral": ("mistral", None, "fp32"),
    "bert": ("bert", "token-classification", "fp32"),
    "llama-bf16": ("llama", None, "bf16"),
    "gpt2-bf16": ("gpt2", None, "bf16"),
    "qwen3-bf16": ("qwen3", None, "bf16"),
    "gpt2-odd-vocab": ("gpt2-511.json", None, "fp32"),
    "gpt2-odd-vocab-bf16": ("gpt2-511.json", None, "bf16"),
    "llama-odd-vocab": ("llama-509.json", None, "fp32"),
    "llama-odd-vocab-bf16": ("llama-509.json", None, "bf16"),
    "llama-replicated": ("llama", None, "fp32"),
    # sequence parallelism (pptk.parallel.sequence_parallel): norms and residuals on S/tp chunks between the stages
    "gpt2-sp": ("gpt2", None, "fp32"),
    "llama-sp": ("llama", None, "fp32"),
    "qwen3-sp": ("qwen3", None, "fp32"),
    "mistral-sp": ("mistral", None, "fp32"),
    "gpt2-sp-bf16": ("gpt2", None, "bf16"),
    "llama-sp-bf16": ("llama", None, "bf16"),
    "qwen3-sp-bf16": ("qwen3", None, "bf16"),
    "llama-odd-vocab-sp": ("llama-509.json", None, "fp32"),
    # selective checkpointing (each block's attention recomputed) on tensor-parallel shards, with and without SP
    "gpt2-recompute": ("gpt2", None, "fp32"),
    "qwen3-sp-recompute-bf16": ("qwen3", None, "bf16"),
    # decoder heads (docs/preference.md): the score head replicated like an untied LM head; the reward loss on pairs
    "llama-reward": ("llama", "reward", "fp32"),
    "qwen3-classifier-bf16": ("qwen3", "sequence-classification", "bf16"),
}
ODD_VOCAB = {  # vocabularies tp=2 does not divide
    "gpt2-511.json": {
        "model_type": "gpt2",
        "vocab_size": 511,
        "n_embd": 64,
        "n_layer": 4,
        "n_head": 4,
        "n_positions": 64,
    },
    "llama-509.json": {
        "model_type": "llama",
        "vocab_size": 509,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
        "max_position_embeddings": 64,
    },
}


def _job(name: str, folder):
    from pptk.verify.run import VerifyJob

    model, task, precision = JOBS[name]
    if model in ODD_VOCAB:
        path = folder / model
        path.write_text(json.dumps({**ODD_VOCAB[model], "bos_token_id": 0, "eos_token_id": 0}))
        model = str(path)
    vocab_parallel = False if name.endswith("-replicated") else None
    return VerifyJob(
        model,
        task=task,
        precision=precision,
        seq_len=24,
        vocab_parallel=vocab_parallel,
        sequence_parallel="-sp" in name,
        selective_checkpointing="-recompute" in name,
        attn_implementation="eager" if model in EAGER_ONLY else "sdpa",
    )


@pytest.fixture(scope="module")
def verified_tp2(tmp_path_factory):
    from pptk.verify.run import verify_many

    work = tmp_path_factory.mktemp("verify-tp2")
    return dict(zip(JOBS, verify_many([_job(name, work) for name in JOBS], pp=2, tp=2, workdir=work)))


@pytest.mark.parametrize("name", list(JOBS))
def test_pp2_tp2_matches_hugging_face(verified_tp2, name):
    result = verified_tp2[name]
    assert result.passed, result.describe()
    assert (result.pp, result.tp, result.precision) == (2, 2, JOBS[name][2])
    assert result.params_pipeline == result.params_reference


@pytest.mark.parametrize("name", [n for n, (_, task, _) in JOBS.items() if task is None])
def test_causal_lms_split_the_vocabulary_unless_told_not_to(verified_tp2, name):
    """verify says how it split the vocabulary, padding included."""
    result = verified_tp2[name]
    if name.endswith("-replicated"):
        assert result.vocab_split == ""
        return
    vocab = {"gpt2-511.json": 511, "llama-509.json": 509}.get(JOBS[name][0])
    assert result.vocab_split.startswith("split over tp=2"), result.describe()
    if vocab is not None:
        assert f"({vocab}, padded to {vocab + 1})" in result.vocab_split
    assert result.vocab_split.endswith("; sequence parallel") == ("-sp" in name)


def test_vocab_split_halves_the_embedding_and_head_on_each_rank(verified_tp2):
    split, whole = verified_tp2["llama"].params_per_rank, verified_tp2["llama-replicated"].params_per_rank
    vocab_rows = 256 * 64  # the small llama config: one embedding and one untied LM head, on stages 0 and 1
    assert [whole[r] - split[r] for r in range(4)] == [vocab_rows // 2] * 4


# `--tp 2` alone (pp=1 x tp=2 x dp=1, 2 ranks): the tied GPT-2, llama's grouped-query attention in fp32 and bf16,
# and BERT token classification, in one launch.
ALONE = ["gpt2", "llama", "llama-bf16", "bert", "llama-sp"]


@pytest.fixture(scope="module")
def verified_tp2_alone(tmp_path_factory):
    from pptk.verify.run import verify_many

    work = tmp_path_factory.mktemp("verify-tp2-alone")
    return dict(zip(ALONE, verify_many([_job(name, work) for name in ALONE], pp=1, tp=2, workdir=work)))


@pytest.mark.parametrize("name", ALONE)
def test_tp2_alone_matches_hugging_face(verified_tp2_alone, name):
    result = verified_tp2_alone[name]
    assert result.passed, result.describe()
    assert (result.pp, result.tp, result.dp, result.precision) == (1, 2, 1, JOBS[name][2])
    held = result.params_per_rank
    assert len(held) == 2 and held[0] == held[1] < result.params_reference  # each rank a slice of the one stage


# Every family with TP support, at pp=1 x tp=2 x dp=2 (tensor parallelism alone within a stage, and with data
# parallelism): one launch of 4 ranks.


@pytest.fixture(scope="module")
def verified_tp2_dp2(tmp_path_factory):
    from pptk.verify.run import VerifyJob, verify_many

    jobs = [
        VerifyJob(name, seq_len=24, attn_implementation="eager" if name in EAGER_ONLY else "sdpa")
        for name in TP_DECODERS
    ]
    jobs += [VerifyJob("gpt2", seq_len=24), VerifyJob("bert", task="token-classification", seq_len=24)]
    names = [*TP_DECODERS, "gpt2", "bert"]
    return dict(zip(names, verify_many(jobs, pp=1, tp=2, dp=2, workdir=tmp_path_factory.mktemp("verify-tp2-dp2"))))


@pytest.mark.parametrize("name", [*TP_DECODERS, "gpt2", "bert"])
def test_every_tp_family_matches_hugging_face_at_tp2_dp2(verified_tp2_dp2, name):
    result = verified_tp2_dp2[name]
    assert result.passed, result.describe()
    assert (result.pp, result.tp, result.dp) == (1, 2, 2)


def test_refused_families_are_few_and_said_why():
    dense_refused = set(TP_REFUSED) - set(MOE_FAMILIES)  # every MoE family is refused until experts shard
    assert dense_refused <= set(FAMILIES) and len(dense_refused) <= 7 and len(TP_DECODERS) >= 20
    assert all(reason for reason in TP_REFUSED.values())


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_each_tp_rank_holds_a_slice(verified_tp2, name):
    """Ranks 2s and 2s+1 are the two tp ranks of stage s: each holds less than the stage, together more (the
    replicated embeddings and norms)."""
    result = verified_tp2[name]
    held = result.params_per_rank
    assert len(held) == 4 and held[0] == held[1] and held[2] == held[3]
    for stage, total in enumerate(result.params_per_stage):
        assert held[2 * stage] < total < 2 * held[2 * stage]


# LLaMA in fp32 without dropout: a resume on another layout must continue the loss curve to float rounding.
RUN_ARGS = [
    "--demo",
    "--model",
    "llama",
    "--max-steps",
    "6",
    "--save-every",
    "2",
    "--log-every",
    "1",
    "--eval-every",
    "1000",
    "--wandb-mode",
    "disabled",
    "--no-dropout",
    "--global-batch-size",
    "8",
    "--pp",
    "1",
]


def _losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _run(out_dir, ranks: int, extra: list[str]):
    launcher = ["--num_gpus", str(ranks), "--master_port", str(free_port())]
    run = run_recipe("gpt_pretrain.py", RUN_ARGS + extra, output_dir=out_dir, launcher=launcher)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return run


@pytest.fixture(scope="module")
def tp1_then_tp2(tmp_path_factory):
    """1 rank at tp=1 for 6 steps (saves every 2); 2 ranks at tp=2 x pp=1 resuming from step 2, exporting at the end;
    from the tp=2 run's step 4, 2 ranks at tp=1 x pp=2 (slices merged) and 2 at tp=2 again (each rank its own
    files, with --sequence-parallel and every block recomputed)."""
    base, resumed, swapped, again = (tmp_path_factory.mktemp(name) for name in ("tp1", "tp2", "pp2", "tp2-again"))
    _run(base, 1, ["--tp", "1"])
    run = _run(
        resumed,
        2,
        ["--tp", "2", "--resume-from", str(base / "checkpoints" / "step2"), "--export-hf", str(resumed / "hf")],
    )
    _run(swapped, 2, ["--tp", "1", "--pp", "2", "--resume-from", str(resumed / "checkpoints" / "step4")])
    # sequence parallelism (and recomputing every block) changes no weight, only where the activations live: the same
    # files, the same curve
    sequence = ["--sequence-parallel", "--activation-checkpoint-interval", "1"]
    _run(again, 2, ["--tp", "2", *sequence, "--resume-from", str(resumed / "checkpoints" / "step4")])
    return base, resumed, run, swapped, again


def test_tp2_resumes_a_tp1_checkpoint_on_the_same_curve(tp1_then_tp2):
    base, resumed, run, *_ = tp1_then_tp2
    assert "pp(1) x tp(2) x dp(1) = WORLD_SIZE(2)" in run.stdout + run.stderr
    before, after = _losses(base), _losses(resumed)
    assert sorted(after) == [3, 4, 5, 6]
    for step, loss in after.items():
        assert loss == pytest.approx(before[step], rel=1e-5), (step, before[step], loss)


@pytest.mark.parametrize("which", ["tp1 x pp2", "tp2 again, sequence parallel"])
def test_a_tp2_pp1_checkpoint_resumes_at_tp1_pp2_and_at_tp2_on_the_same_curve(tp1_then_tp2, which):
    base, *_, swapped, again = tp1_then_tp2
    before, after = _losses(base), _losses(swapped if which == "tp1 x pp2" else again)
    assert sorted(after) == [5, 6]
    for step, loss in after.items():
        assert loss == pytest.approx(before[step], rel=1e-5), (step, before[step], loss)


def test_tp2_checkpoint_holds_each_ranks_slices_which_merge_to_the_tp1_run_and_export(tp1_then_tp2):
    """The tp=2 run's step-6 checkpoint holds one file per layer and tp rank (DeepSpeed's ``-model_YY`` names), each
    a slice; merged, they equal the tp=1 run's own step 6, and --export-hf wrote exactly those tensors under Hugging
    Face's names."""
    base, resumed, *_ = tp1_then_tp2
    tag, reference = resumed / "checkpoints" / "step6", base / "checkpoints" / "step6"
    manifest = json.loads((tag / "pptk.json").read_text())
    assert manifest["layout"]["tp"] == 2 and manifest["tensor_parallel"]["size"] == 2
    assert not list(tag.glob("layer_??-model_states.pt")), "no layer is gathered to full size"
    shards = [torch.load(tag / f"layer_01-model_{r:02d}-model_states.pt") for r in (0, 1)]
    full_q = torch.load(reference / "layer_01-model_states.pt")["self_attn.q_proj.weight"]
    assert [s["self_attn.q_proj.weight"].shape[0] for s in shards] == [full_q.shape[0] // 2] * 2
    assert torch.equal(shards[0]["input_layernorm.weight"], shards[1]["input_layernorm.weight"])  # replicated
    layers = sorted(reference.glob("layer_??-model_states.pt"))
    assert len(layers) >= 4
    for theirs in layers:
        index = int(theirs.name[6:8])
        # Adam normalises each gradient, so the tp all-reduces' summation order moves the few elements with
        # near-zero gradients by up to ~1e-3 of a step (lr 3e-3); a wrong slice would be off by ~1e-2
        merged = read_layer(tag, manifest, index)
        torch.testing.assert_close(merged, torch.load(theirs), rtol=1e-4, atol=1e-5)
        optim = read_optimizer_states(tag, manifest, index)
        torch.testing.assert_close(optim, torch.load(optim_file(reference, index)), rtol=1e-4, atol=1e-5)
    exported = AutoModelForCausalLM.from_pretrained(resumed / "hf").state_dict()
    for name, tensor in read_layer(tag, manifest, 1).items():  # the first decoder layer
        assert torch.equal(exported[f"model.layers.0.{name}"], tensor), name


def test_the_vocabulary_split_is_saved_in_slices_and_exported_whole_bitwise(tp1_then_tp2, tmp_path):
    """The tp=2 run split LLaMA's embedding (layer 0) and untied LM head (the last layer) by vocabulary: each rank
    saved its half of the demo tokenizer's 4096 rows, the manifest says so, and both --export-hf and `pptk convert
    ds-to-hf` write the rows back whole and in order, bitwise."""
    from pptk.checkpoints.convert import ds_to_hf

    _, resumed, *_ = tp1_then_tp2
    tag = resumed / "checkpoints" / "step6"
    manifest = json.loads((tag / "pptk.json").read_text())
    splits = manifest["tensor_parallel"]["splits"]
    head = next(int(index) for index, names in splits.items() if "lm_head.weight" in names)
    assert splits["0"] == {"weight": [0, 1]} and splits[str(head)] == {"lm_head.weight": [0, 1]}
    rows = {}
    for index, name, hf_name in (
        (0, "weight", "model.embed_tokens.weight"),
        (head, "lm_head.weight", "lm_head.weight"),
    ):
        shards = [torch.load(tag / f"layer_{index:02d}-model_{r:02d}-model_states.pt")[name] for r in (0, 1)]
        assert shards[0].shape == shards[1].shape
        rows[hf_name] = torch.cat(shards)
    ds_to_hf(tag, tmp_path / "converted")
    for folder in (resumed / "hf", tmp_path / "converted"):
        exported = AutoModelForCausalLM.from_pretrained(folder).state_dict()
        for hf_name, tensor in rows.items():
            assert exported[hf_name].shape[0] == 4096 and torch.equal(exported[hf_name], tensor), (folder, hf_name)


def test_zero0_fp32_clipping_at_tp2_applies_the_tp1_factor(tmp_path):
    """fp32 without ZeRO clips in pptk's replacement of DeepSpeed's clip_fp32_gradients (the engine's own counts
    only stage 0): the norm must cover every stage and tp rank, each replicated tensor once, or the tp ranks clip by
    different, too small norms and their replicated weights drift apart. A clip of 0.01 acts on every step."""
    from pptk.training.ds_config import load_ds_config, shipped_config

    config = load_ds_config(shipped_config("fp32"))
    config["zero_optimization"]["stage"] = 0
    (tmp_path / "zero0.json").write_text(json.dumps(config))
    clipped = ["--pp", "2", "--ds-config", str(tmp_path / "zero0.json"), "--grad-clip", "0.01", "--lr", "0.1"]
    clipped += ["--warmup-steps", "1", "--max-steps", "4", "--save-every", "100"]
    whole, split = tmp_path / "tp1", tmp_path / "tp2"
    _run(whole, 2, [*clipped, "--tp", "1"])
    _run(split, 4, [*clipped, "--tp", "2"])
    before, after = _losses(whole), _losses(split)
    assert sorted(after) == [1, 2, 3, 4] and before[1] != before[4]
    for step, loss in after.items():
        assert loss == pytest.approx(before[step], rel=1e-5), (step, before[step], loss)
