# Schedules, the 2 x pp DualPipeV plan, the profiled partition, and the step analysis behind the measured bubble.
import re

import pytest

from pptk.cli import main
from pptk.cli.timeline import chrome_trace, segments
from pptk.errors import PptkError
from pptk.parallel.layout import Layout
from pptk.parallel.pipeline import plan_pipeline
from pptk.parallel.schedules import check_schedule, ideal_efficiency
from pptk.training.observe import analyse_step, summarise


@pytest.mark.parametrize(("pp", "m"), [(2, 4), (2, 8), (4, 8), (4, 16)])
def test_replaying_1f1b_gives_its_textbook_efficiency(pp, m):
    assert ideal_efficiency("1f1b", pp=pp, micro_batches=m) == pytest.approx(m / (m + pp - 1))


@pytest.mark.parametrize(("pp", "m"), [(2, 4), (2, 8), (4, 8)])
def test_dualpipev_ideal_beats_1f1b_at_the_same_layout(pp, m):
    assert ideal_efficiency("dualpipev", pp=pp, micro_batches=m) > ideal_efficiency("1f1b", pp=pp, micro_batches=m)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(schedule="dualpipev", pp=2, micro_batches=3), "needs at least 2 * pp = 4 micro-batches"),
        (dict(schedule="dualpipev", pp=1, micro_batches=4), "needs --pp 2 or more"),
        (dict(schedule="interleaved", pp=2, micro_batches=4), "unknown schedule 'interleaved'"),
        (dict(schedule="dualpipev", pp=2, micro_batches=4, tp=2), "--schedule dualpipev with --tp 2 is not supported"),
    ],
)
def test_schedule_constraints_are_clear_errors(kwargs, message):
    schedule, pp, m, tp = kwargs["schedule"], kwargs["pp"], kwargs["micro_batches"], kwargs.get("tp", 1)
    with pytest.raises(PptkError, match=re.escape(message)):
        check_schedule(schedule, pp=pp, micro_batches=m, tp=tp)
    with pytest.raises(PptkError, match=re.escape(message)):
        Layout(pp=pp, tp=tp, dp=1, micro_batch_size=2, grad_accum_steps=m, schedule=schedule)


def test_dualpipev_plans_two_stages_per_rank_with_embedding_and_head_on_rank_0():
    plan = plan_pipeline("gpt2", num_stages=2, schedule="dualpipev")
    stages = plan.stages
    assert stages.num_stages == 4 and stages.num_ranks == 2
    assert [stages.rank_stages(r) for r in range(2)] == [(0, 3), (1, 2)]
    tied = [c.index for c in stages.costs if plan.layers[c.index].tied_key]
    assert {stages.rank_of(i) for i in tied} == {0}  # the tied embedding/head: no cross-rank reduction
    assert sorted(c.index for r in range(2) for c in stages.rank_layers(r)) == list(range(len(plan.layers)))


def test_profile_partition_balances_measured_times(capsys):
    plan = plan_pipeline("gpt2", num_stages=2, partition_method="profile", seq_len=16)
    measured = plan.stages.measured_ms
    assert measured is not None and len(measured) == len(plan.layers) and all(t > 0 for t in measured)
    assert main(["plan", "gpt2", "--pp", "2", "--partition-method", "profile", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "measured ms" in out and "GFLOP/token" in out


def test_measured_bubble_is_wait_plus_gaps():
    # stage 1 waits 30 ms in its first receive (the pipeline filling), the fastest receive took 2 ms
    ranks = [
        {"rank": 0, "stage": 0, "dp_rank": 0, "step_s": 0.100, "events": [
            ("ForwardPass", 0, 0.000, 0.030), ("SendActivation", 0, 0.030, 0.032),
            ("RecvGrad", 0, 0.032, 0.090), ("BackwardPass", 0, 0.090, 0.100)]},
        {"rank": 1, "stage": 1, "dp_rank": 0, "step_s": 0.100, "events": [
            ("RecvActivation", 0, 0.000, 0.032), ("ForwardPass", 0, 0.032, 0.062),
            ("BackwardPass", 0, 0.062, 0.088), ("SendGrad", 0, 0.088, 0.090)]},
    ]  # fmt: skip
    stages = analyse_step(ranks)
    second = stages[1]
    assert second["comm_wait_s"] == pytest.approx(0.030)
    assert second["idle_s"] == pytest.approx(0.010)
    assert second["bubble"] == pytest.approx(0.40)
    for stage in stages:
        covered = sum(stage[f"{p}_s"] for p in ("forward", "backward", "comm", "comm_wait", "optimizer", "idle"))
        assert covered == pytest.approx(stage["step_s"])
        idle = sum(end - start for kind, start, end, _ in segments(stage) if kind == "idle")
        assert idle / stage["step_s"] == pytest.approx(stage["bubble"])
    metrics = summarise(stages, flops_per_step=1e12, world_size=2, peak=5.0)
    assert metrics["pipe/tflops"] == pytest.approx(10.0) and metrics["pipe/mfu"] == pytest.approx(1.0)
    assert metrics["pipe/imbalance"] == pytest.approx(0.056 / 0.040)  # max / min busy (forward+backward+optimizer)
    trace = chrome_trace({"step": 1, "stages": stages})
    assert {e["pid"] for e in trace["traceEvents"]} == {0, 1}


def test_timeline_and_plot_refuse_a_directory_without_a_run(tmp_path, capsys):
    assert main(["timeline", str(tmp_path)]) == 2
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no timeline.json" in err and "has no metrics.jsonl" in err
