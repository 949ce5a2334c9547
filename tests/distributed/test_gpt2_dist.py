# GPT-2 on real gloo ranks: parity at pp=2, 3 and 4 and pp=2 x dp=2 (ZeRO-1), fail-fast, and the recipe end to end.
import json
import subprocess
import time

import pytest
import torch.distributed as dist
from conftest import VENV_BIN, run_recipe

from pptk.errors import PptkError
from pptk.launch.ranks import run_ranks
from pptk.verify.run import verify

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def pp2(verified_pp2):
    """The tied default and an untied config with 3 micro-batches, from the session's shared pp=2 launch."""
    return [verified_pp2[("gpt2", "tied")], verified_pp2[("gpt2", "untied")]]


@pytest.fixture(scope="module")
def pp2_dp2():
    return verify("gpt2", pp=2, dp=2, micro_batches=2)


@pytest.fixture(scope="module")
def pp4_cli():
    out = subprocess.run(
        [str(VENV_BIN / "pptk"), "verify", "gpt2", "--pp", "4", "--json"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_pp2_tied_and_untied_match_hugging_face(pp2):
    for result in pp2:
        assert result.passed, result.describe()
        assert result.loss_rel_diff <= 1e-5 and result.max_param_diff <= 1e-5
        assert result.params_pipeline == result.params_reference
        assert all(n > 0 for n in result.params_per_stage)
    assert pp2[0].stages[0][0] == "0:TokenEmbeddingPipe" and pp2[0].stages[1][-1].endswith("TokenEmbeddingPipe")
    assert pp2[1].stages[1][-1].endswith("LMHeadPipe")


def test_pp4_through_the_cli(pp4_cli):
    assert pp4_cli["passed"] and pp4_cli["pp"] == 4
    assert len(pp4_cli["params_per_stage"]) == 4
    assert sum(pp4_cli["params_per_stage"]) == pp4_cli["params_reference"]
    assert pp4_cli["max_param_diff"] <= 1e-5


def test_pp2_dp2_zero1_matches_and_replicas_are_identical(pp2_dp2):
    assert pp2_dp2.passed, pp2_dp2.describe()
    assert pp2_dp2.dp == 2 and pp2_dp2.zero_stage == 1
    assert pp2_dp2.replica_max_diff == 0.0


def _wait_then_fail(rank: int) -> None:
    from pptk.training.engine import init_distributed

    init_distributed()
    if rank == 1:
        raise ValueError("rank 1 broke on purpose")
    dist.barrier()  # rank 0 would wait here forever without fail-fast
    time.sleep(600)


def test_a_failing_rank_stops_the_others_at_once(tmp_path):
    start = time.monotonic()
    with pytest.raises(PptkError, match="rank1 failed: ValueError: rank 1 broke on purpose"):
        run_ranks(_wait_then_fail, world_size=2, log_dir=tmp_path, timeout_s=120)
    assert time.monotonic() - start < 60


def test_demo_recipe_trains_logs_and_checkpoints(demo_run):
    out_dir, stdout = demo_run
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    for r in train:
        assert {"step", "loss", "lr", "tokens_per_s", "samples_per_s"} <= set(r) and r["tokens_per_s"] > 0
        assert all(key.startswith("pipe/") for key in set(r) - {"step", "loss", "lr", "tokens_per_s", "samples_per_s"})
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, [r["loss"] for r in train]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    ckpt = out_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step40"
    assert {p.name for p in ckpt.iterdir()} >= {"step20", "step40"}
    # one file per layer: embedding, positions, each block, final norm (the tied LM head is layer 0's file)
    n_layer = json.loads((out_dir / "hf_config" / "config.json").read_text())["n_layer"]
    assert len(list((ckpt / "step40").glob("layer_*-model_states.pt"))) == n_layer + 3
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["last_loss"] < summary["first_loss"]
    assert list((out_dir / "wandb").glob("offline-run-*")), "W&B must run offline without an account"
    assert "== pptk summary ==" in stdout and "tokens/s" in stdout
    assert (out_dir / "hf_config" / "config.json").is_file() and (out_dir / "hf_config" / "tokenizer.json").is_file()


def test_recipe_refuses_a_layout_that_does_not_fit_the_world_size(tmp_path):
    run = run_recipe("gpt_pretrain.py", ["--demo", "--pp", "3"], output_dir=tmp_path, timeout=120)
    assert run.returncode != 0
    assert "--pp" in run.stderr + run.stdout and "WORLD_SIZE(2)" in run.stderr + run.stdout


def test_the_demo_run_logs_no_moe_metrics(demo_run):
    """The MoE meter (tests/distributed/test_moe_dist.py) is off the hot path of dense models: the session's GPT-2
    demo run logs none of its keys."""
    out, _ = demo_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and not any(k.startswith(("router_", "expert_")) for r in records for k in r)
