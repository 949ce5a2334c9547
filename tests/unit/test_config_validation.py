# Every number a run takes is checked once (pptk.training.config.check_settings): nan, inf and out-of-range values are
# one line naming the flag, the value and the range, the same for the recipes, `pptk plan` and `pptk verify`.
import argparse
import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

from pptk.cli import build_parser
from pptk.cli.run_flags import add_run_flags, run_config
from pptk.data.corpus import collect_sets, parse_entry
from pptk.errors import PptkError
from pptk.tasks.causal_lm import CausalLMData
from pptk.training.config import NUMBERS, OptimConfig, OutputConfig, ParallelConfig, RunConfig, check_settings

ROOT = Path(__file__).resolve().parents[2]


def _run(*flags: str, data=None) -> RunConfig:
    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    args = parser.parse_args(["--output-dir", "unused", *flags])
    return run_config(args, data=data if data is not None else CausalLMData())


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# (flag, a value it refuses, the error). Each numeric flag of add_run_flags appears (checked below).
BAD = [
    ("--pp", "0", "--pp must be an integer >= 1, got 0"),
    ("--pp", "-1", "--pp must be an integer >= 1, got -1"),
    ("--tp", "0", "--tp must be an integer >= 1, got 0"),
    ("--tp", "-2", "--tp must be an integer >= 1, got -2"),
    ("--micro-batch-size", "0", "--micro-batch-size must be an integer >= 1, got 0"),
    ("--grad-accum-steps", "0", "--grad-accum-steps must be an integer >= 1, got 0"),
    ("--global-batch-size", "-8", "--global-batch-size must be an integer >= 1, got -8"),
    ("--zero-stage", "4", "--zero-stage must be an integer from 0 to 3, got 4"),
    ("--zero-stage", "-1", "--zero-stage must be an integer from 0 to 3, got -1"),
    ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
    ("--lr", "inf", "--lr must be a finite number > 0, got inf"),
    ("--lr", "0", "--lr must be a finite number > 0, got 0.0"),
    ("--lr", "-1e-3", "--lr must be a finite number > 0, got -0.001"),
    ("--weight-decay", "nan", "--weight-decay must be a finite number >= 0, got nan"),
    ("--weight-decay", "inf", "--weight-decay must be a finite number >= 0, got inf"),
    ("--weight-decay", "-0.1", "--weight-decay must be a finite number >= 0, got -0.1"),
    ("--warmup-steps", "0", "--warmup-steps must be an integer >= 1, got 0"),
    ("--grad-clip", "nan", "--grad-clip must be a finite number >= 0, got nan"),
    ("--grad-clip", "inf", "--grad-clip must be a finite number >= 0, got inf"),
    ("--grad-clip", "-1", "--grad-clip must be a finite number >= 0, got -1.0"),
    ("--max-steps", "0", "--max-steps must be an integer >= 1, got 0"),
    ("--epochs", "0", "--epochs must be an integer >= 1, got 0"),
    ("--loss-spike-factor", "nan", "--loss-spike-factor must be a finite number > 1, or 0 (off), got nan"),
    ("--loss-spike-factor", "inf", "--loss-spike-factor must be a finite number > 1, or 0 (off), got inf"),
    ("--loss-spike-factor", "1", "--loss-spike-factor must be a finite number > 1, or 0 (off), got 1.0"),
    ("--loss-spike-factor", "-2", "--loss-spike-factor must be a finite number > 1, or 0 (off), got -2.0"),
    ("--max-bad-steps", "0", "--max-bad-steps must be an integer >= 1, got 0"),
    ("--peak-tflops", "nan", "--peak-tflops must be a finite number > 0, got nan"),
    ("--peak-tflops", "inf", "--peak-tflops must be a finite number > 0, got inf"),
    ("--peak-tflops", "0", "--peak-tflops must be a finite number > 0, got 0.0"),
    ("--activation-checkpoint-interval", "-1", "--activation-checkpoint-interval must be an integer >= 0, got -1"),
    ("--seed", "-1", "--seed must be an integer from 0 to 2147483647, got -1"),
    ("--seed", str(2**32), f"--seed must be an integer from 0 to 2147483647, got {2**32}"),
    ("--log-every", "0", "--log-every must be an integer >= 1, got 0"),
    ("--eval-every", "-5", "--eval-every must be an integer >= 1, got -5"),
    ("--eval-batches", "0", "--eval-batches must be an integer >= 1, got 0"),
    ("--save-every", "0", "--save-every must be an integer >= 1, got 0"),
    ("--lora-r", "0", "--lora-r must be an integer >= 1, got 0"),
    ("--lora-r", "-4", "--lora-r must be an integer >= 1, got -4"),
    ("--lora-alpha", "nan", "--lora-alpha must be a finite number > 0, got nan"),
    ("--lora-alpha", "0", "--lora-alpha must be a finite number > 0, got 0.0"),
    ("--lora-dropout", "1.5", "--lora-dropout must be a finite number >= 0 and <= 1, got 1.5"),
    ("--lora-dropout", "-0.1", "--lora-dropout must be a finite number >= 0 and <= 1, got -0.1"),
]


@pytest.mark.parametrize(("flag", "value", "message"), BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_every_numeric_run_flag_refuses_bad_values_in_one_line(flag, value, message):
    with pytest.raises(PptkError) as err:
        _run(f"{flag}={value}")
    assert str(err.value) == message


def test_every_numeric_run_flag_has_a_range_and_a_bad_case_above():
    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    numeric = {
        action.dest: action.option_strings[0]
        for action in parser._actions
        if action.type in (int, float) and action.dest != "local_rank"  # set by the deepspeed launcher
    }
    assert {name: NUMBERS[name].flag for name in numeric} == numeric
    assert set(numeric.values()) == {flag for flag, _, _ in BAD}


@pytest.mark.parametrize("command", ["plan", "verify"])
def test_every_numeric_flag_of_plan_and_verify_has_a_range(command):
    parsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    numeric = {a.dest: a.option_strings[0] for a in parsers[command]._actions if a.type in (int, float)}
    assert numeric and {name: NUMBERS[name].flag for name in numeric} == numeric


def test_every_number_the_run_config_holds_has_a_range():
    for part in (ParallelConfig, OptimConfig, OutputConfig, RunConfig):
        for f in dataclasses.fields(part):
            if re.search(r"\b(int|float)\b", str(f.type)):
                assert f.name in NUMBERS, f"{part.__name__}.{f.name} has no range in NUMBERS"


def test_the_edges_of_each_range_are_accepted():
    run = _run(
        *("--zero-stage", "0", "--grad-clip", "0", "--weight-decay", "0", "--loss-spike-factor", "0"),
        *("--activation-checkpoint-interval", "0", "--seed", "0", "--lr", "1e-12", "--peak-tflops", "0.5"),
    )
    assert (run.optim.grad_clip, run.optim.loss_spike_factor, run.seed) == (0.0, 0.0, 0)
    assert _run("--seed", str(2**31 - 1), "--loss-spike-factor", "1.01").seed == 2**31 - 1


def test_all_problems_are_one_line():
    with pytest.raises(PptkError) as err:
        _run("--lr", "nan", "--save-every", "0")
    assert str(err.value) == "--lr must be a finite number > 0, got nan; --save-every must be an integer >= 1, got 0"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--pp", "2", "--tp", "2", "--schedule", "dualpipev"], "--schedule dualpipev with --tp 2 is not supported"),
        (["--pp", "1", "--schedule", "dualpipev"], "--schedule dualpipev needs --pp 2 or more"),
        (["--pp", "2", "--schedule", "dualpipev", "--grad-accum-steps", "3"], "needs at least 2 * pp = 4 micro"),
        (["--pp", "2", "--zero-stage", "2"], "--zero-stage 2 with --pp 2: DeepSpeed's pipeline engine supports"),
    ],
)
def test_the_run_config_refuses_the_layouts_plan_and_verify_refuse(flags, message):
    with pytest.raises(PptkError, match=re.escape(message)):
        _run(*flags)


def test_max_steps_or_epochs():
    with pytest.raises(PptkError, match="give --max-steps or --epochs"):
        dataclasses.replace(_run(), optim=OptimConfig(max_steps=None))


def test_check_settings_names_the_flag():
    with pytest.raises(PptkError, match=re.escape("--tolerance must be a finite number > 0, got nan")):
        check_settings(tolerance=float("nan"))
    check_settings(tolerance=None)  # not given: the default follows


# ------------------------------------------------------------------------------------------------ blend weights


@pytest.mark.parametrize(
    ("entry", "shown"),
    [("runs/a:nan", "nan"), ("runs/a:inf", "inf"), ("runs/a:1e400", "inf"), ("runs/a:-1", "-1.0"), ("runs/a:0", "0.0")],
)
def test_a_blend_weight_must_be_finite_and_positive(entry, shown, tmp_path):
    message = f"--data runs/a:{shown}: a blend weight must be a finite number > 0 (the set's share of the samples)"
    with pytest.raises(PptkError, match=re.escape(message)):
        parse_entry(entry)
    with pytest.raises(PptkError, match=re.escape(message)):  # before any file is opened or prepared
        collect_sets([entry, "runs/b:1"], tokenizer=None, cache_dir=tmp_path)
    with pytest.raises(PptkError, match=re.escape(message)):  # the run config refuses it before the task runs
        _run(data=CausalLMData(files=(Path("runs/b:1"), Path(entry))))


def test_all_zero_blend_weights_are_refused():
    with pytest.raises(PptkError) as err:
        _run(data=CausalLMData(files=(Path("runs/a:0"), Path("runs/b:0"))))
    assert str(err.value).count("a blend weight must be a finite number > 0") == 2


def test_finite_positive_weights_and_paths_with_colons_are_kept():
    assert parse_entry("runs/a:0.25").weight == 0.25 and parse_entry("runs/a").weight is None
    assert parse_entry("notes:v2.txt") == parse_entry(Path("notes:v2.txt"))  # no number after the colon: a path
    assert parse_entry("notes:v2.txt").weight is None


# ------------------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize(
    ("recipe", "argv", "message"),
    [
        ("gpt_pretrain", ["--demo", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        ("gpt_pretrain", ["--demo", "--seq-len", "0"], "--seq-len must be an integer >= 1, got 0"),
        ("gpt_pretrain", ["--model", "gpt2", "--data", "runs/a:nan", "runs/b:1"], "--data runs/a:nan: a blend weight"),
        ("gpt_pretrain", ["--demo", "--pp", "2", "--tp", "2", "--schedule", "dualpipev"], "with --tp 2 is not"),
        ("bert_mlm", ["--model", "m", "--data", "a.txt", "--max-seq-len", "-1"], "--max-seq-len must be an integer"),
        ("bert_mlm", ["--model", "m", "--data", "a.txt", "--loss-spike-factor", "inf"], "--loss-spike-factor must"),
        (
            "bert_finetune",
            [
                "--model",
                "bert",
                "--task",
                "sequence-classification",
                "--train",
                "t",
                "--eval",
                "e",
                "--num-labels",
                "0",
            ],
            "--num-labels must be an integer >= 1, got 0",
        ),
    ],
)
def test_recipes_refuse_bad_numbers_when_they_build_the_run(recipe, argv, message):
    with pytest.raises(PptkError, match=re.escape(message)):
        _recipe(recipe).build([*argv, "--output-dir", "unused"])
