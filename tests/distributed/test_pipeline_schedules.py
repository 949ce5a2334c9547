# DualPipeV parity vs Hugging Face (from the shared pp=2 verify launch), measured pipeline metrics and the timeline of
# the shared demo run, and resuming a 1F1B checkpoint under DualPipeV and back.
import json

import pytest
from conftest import DEMO_ARGS, run_recipe

from pptk.cli import main
from pptk.cli.timeline import segments
from pptk.training.observe import PARTS

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert-classification", "gpt2-bf16"])
def test_dualpipev_matches_hugging_face(verified_pp2, name):
    result = verified_pp2[("dualpipev", name)]
    assert result.passed, result.describe()
    assert result.schedule == "dualpipev"
    # rank 0 holds stage 0 (the embedding) and stage 3 (the head): two stages a rank
    first, last = result.stages[0][0], result.stages[0][-1]
    assert first.startswith("0:") and "Embedding" in first
    assert any(word in last for word in ("Head", "Classifier", "Embedding"))
    assert len(result.stages) == 2 and sum(result.params_per_stage) == result.params_reference


def _metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_every_logged_step_has_measured_pipeline_metrics(demo_run):
    out_dir, _ = demo_run
    logged = [r for r in _metrics(out_dir) if "loss" in r]
    assert logged and all("pipe/bubble" in r for r in logged)
    for record in logged:
        assert 0 < record["pipe/bubble"] < 1 and record["pipe/imbalance"] >= 1 and record["pipe/tflops"] > 0
        for stage in (0, 1):
            parts = [record[f"pipe/stage{stage}/{p}_ms"] for p in PARTS]
            assert all(p >= 0 for p in parts)
            assert record[f"pipe/stage{stage}/forward_ms"] > 0 and record[f"pipe/stage{stage}/backward_ms"] > 0
            # the parts cover the step (each rank's own step; step_ms is the longest)
            assert sum(parts) <= record["pipe/step_ms"] * 1.0001


def test_timeline_idle_is_the_logged_bubble_and_plots_render(demo_run, tmp_path):
    out_dir, _ = demo_run
    timeline = json.loads((out_dir / "timeline.json").read_text())
    last = [r for r in _metrics(out_dir) if "loss" in r][-1]
    assert timeline["step"] == last["step"] and len(timeline["stages"]) == 2
    for stage in timeline["stages"]:
        drawn = segments(stage)
        idle = sum(end - start for kind, start, end, _ in drawn if kind == "idle")
        assert abs(idle / stage["step_s"] - last[f"pipe/stage{stage['stage']}/bubble"]) < 0.01
        assert {"forward", "backward"} <= {kind for kind, *_ in drawn}
    png, trace, curves = tmp_path / "t.png", tmp_path / "t.json", tmp_path / "c.png"
    assert main(["timeline", str(out_dir), "--png", str(png), "--trace", str(trace)]) == 0
    assert main(["plot", str(out_dir), "--png", str(curves)]) == 0
    for path in (png, curves):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = json.loads(trace.read_text())["traceEvents"]
    assert {e["pid"] for e in events} == {0, 1} and {"forward", "backward", "idle"} <= {e.get("cat") for e in events}


def test_resume_1f1b_checkpoint_under_dualpipev_and_back(demo_run, tmp_path):
    out_dir, _ = demo_run
    demo = {r["step"]: r["loss"] for r in _metrics(out_dir) if "loss" in r}
    common = [*DEMO_ARGS, "--log-every", "1", "--eval-every", "100"]
    short = ["--max-steps", "22", "--save-every", "22"]
    dual_dir = tmp_path / "dual"
    run = run_recipe(
        "gpt_pretrain.py",
        [*common, "--resume-from", str(out_dir / "checkpoints" / "step20"), "--schedule", "dualpipev", *short],
        output_dir=dual_dir,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    dual = {r["step"]: r["loss"] for r in _metrics(dual_dir) if "loss" in r}
    assert sorted(dual) == [21, 22]
    # the weights and optimizer came along: the loss continues the 1F1B curve, far below a fresh start's
    assert abs(dual[21] - demo[20]) < 0.3 < demo[5] - dual[21]
    manifest = json.loads((dual_dir / "checkpoints" / "step22" / "pptk.json").read_text())
    assert manifest["layout"]["schedule"] == "dualpipev" and len(manifest["boundaries"]) == 5
    back_dir = tmp_path / "back"
    run = run_recipe(
        "gpt_pretrain.py",
        [*common, "--resume-from", str(dual_dir / "checkpoints"), "--max-steps", "23", "--save-every", "23"],
        output_dir=back_dir,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    back = {r["step"]: r["loss"] for r in _metrics(back_dir) if "loss" in r}
    assert sorted(back) == [23] and abs(back[23] - dual[22]) < 0.3
