# Checkpoints through the recipe: exact resume, resume on other layouts, a save killed midway, and the HF export.
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import DEMO_ARGS, free_port, run_recipe
from pptk.checkpoint import find_checkpoint
from pptk.convert import load_sequential_from_checkpoint

pytestmark = pytest.mark.dist
# The layout tests train LLaMA (untied head, rotary tables rebuilt per stage) through the GPT recipe.
LAYOUT_ARGS = ["--demo", "--model", "llama", "--max-steps", "12", "--save-every", "6", "--log-every", "1", "--eval-every", "1000",
               "--wandb-mode", "disabled", "--no-dropout", "--global-batch-size", "16"]


def _losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_exact_resume_reproduces_the_uninterrupted_losses(demo_run, tmp_path):
    """Dropout on, fp32, CPU: data order, lr schedule, RNG and optimizer state all restored -> identical losses."""
    first_dir, _ = demo_run
    run = run_recipe("gpt_pretrain.py", DEMO_ARGS + ["--resume-from", str(first_dir / "checkpoints" / "step20")],
                     output_dir=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    uninterrupted, resumed = _losses(first_dir), _losses(tmp_path)
    assert sorted(resumed) == [25, 30, 35, 40]
    assert all(resumed[s] == uninterrupted[s] for s in resumed), (uninterrupted, resumed)


def test_exported_model_loads_in_transformers_and_matches_the_pipeline(demo_run):
    out_dir, _ = demo_run
    exported = AutoModelForCausalLM.from_pretrained(out_dir / "hf").eval()
    _, pipeline = load_sequential_from_checkpoint(out_dir / "checkpoints")
    ids = torch.randint(0, exported.config.vocab_size, (2, 16))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(exported(input_ids=ids, attention_mask=mask).logits, pipeline.eval()((ids, mask)),
                               rtol=0, atol=1e-5)
    assert (out_dir / "hf" / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def killed_during_save(tmp_path_factory):
    """pp=2 x dp=1 for 12 steps, saving at 6 and 12; rank 1 is SIGKILLed in the middle of the step-12 save."""
    out_dir = tmp_path_factory.mktemp("killed")
    os.environ["PPTK_FAILPOINT"] = "save:1:12"
    try:
        run = run_recipe("gpt_pretrain.py", LAYOUT_ARGS, output_dir=out_dir)
    finally:
        del os.environ["PPTK_FAILPOINT"]
    return out_dir, run


def test_a_killed_save_leaves_the_previous_checkpoint_intact(killed_during_save):
    out_dir, run = killed_during_save
    assert run.returncode != 0, "the launcher must report the killed rank"
    ckpt = out_dir / "checkpoints"
    assert (ckpt / "latest").read_text() == "step6"
    assert (ckpt / "step12.partial").is_dir() and not (ckpt / "step12").exists()
    assert find_checkpoint(ckpt).name == "step6"
    assert sorted(_losses(out_dir)) == list(range(1, 13)), "training itself reached step 12"


# pp=2 -> pp=1 moves layers between stages (and un-splits the tie); pp=2 -> pp=2 x dp=2 re-shards ZeRO-1.
@pytest.mark.parametrize("layout", [["--pp", "1"], ["--pp", "2"]], ids=["pp1", "pp2xdp2"])
def test_resume_on_another_layout_continues_the_curve(killed_during_save, tmp_path, layout):
    base_dir, _ = killed_during_save
    world = {"1": 1, "2": 4}[layout[1]]
    port_args = ["--num_gpus", str(world), "--master_port", str(free_port())]
    run = run_recipe("gpt_pretrain.py", LAYOUT_ARGS + layout + ["--resume-from", str(base_dir / "checkpoints")],
                     output_dir=tmp_path, launcher=port_args)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    base, resumed = _losses(base_dir), _losses(tmp_path)
    assert sorted(resumed) == list(range(7, 13))
    for step, loss in resumed.items():
        assert loss == pytest.approx(base[step], rel=1e-5), (step, base[step], loss)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(exported).__name__ == "LlamaForCausalLM" and not exported.config.tie_word_embeddings
    _, pipeline = load_sequential_from_checkpoint(tmp_path / "checkpoints")
    ids = torch.randint(0, exported.config.vocab_size, (2, 16))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(exported(input_ids=ids, attention_mask=mask).logits, pipeline.eval()((ids, mask)),
                               rtol=0, atol=1e-5)
