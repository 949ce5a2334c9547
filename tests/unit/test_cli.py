# The `pptk` command in-process: plan, models, and bad input exiting 2 with a message before any rank starts.
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pptk.cli import build_parser, main
from pptk.cli.lora_flags import lora_settings
from pptk.cli.plan import bytes_per_param
from pptk.parallel.lora import LoraSettings


def test_plan_json_lists_every_layer_once(capsys):
    assert main(["plan", "gpt2", "--pp", "2", "--dp", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    layers = [name for stage in plan["stages"] for name in stage["layers"]]
    assert len(plan["stages"]) == 2
    assert layers[0] == "0:TokenEmbeddingPipe" and layers[-1].endswith("TokenEmbeddingPipe")
    assert [int(n.split(":")[0]) for n in layers] == list(range(len(layers)))
    assert sum(stage["blocks"] for stage in plan["stages"]) == 4


def test_plan_table_and_memory(capsys):
    assert main(["plan", "gpt2", "--pp", "4", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "GFLOP/token" in out and "stage 3:" in out
    # what DeepSpeed keeps per replica, plus what ZeRO-1 splits over dp (measured: benchmarks/plan_memory.py)
    assert bytes_per_param("fp32", dp=1, zero_stage=1) == 20
    assert bytes_per_param("bf16", dp=4, zero_stage=1) == 8 + 12 / 4
    assert bytes_per_param("bf16", dp=4, zero_stage=0) == 20


@pytest.mark.parametrize(("precision", "weight_bytes"), [("bf16", 2), ("fp32", 4)])
def test_plan_with_lora_counts_frozen_weights_at_their_bytes_and_what_trains_in_full(precision, weight_bytes, capsys):
    per_param = bytes_per_param(precision, dp=1, zero_stage=1)
    assert main(["plan", "llama", "--pp", "2", "--precision", precision, "--json"]) == 0
    full = json.loads(capsys.readouterr().out)["stages"]
    assert main(["plan", "llama", "--pp", "2", "--precision", precision, "--lora-r", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["lora"]["r"] == 8 and plan["lora"]["target_modules"] == "all-linear"
    # r=8 on every block linear of the small LLaMA (hidden 64, k/v 32, MLP 112), two blocks a stage
    assert [row["lora_trained_params"] for row in plan["stages"]] == [2 * 8 * 976] * 2
    for row, without in zip(plan["stages"], full):
        assert row["params"] == without["params"]
        expected = row["params"] * weight_bytes + row["lora_trained_params"] * per_param
        assert row["train_state_gib"] * 2**30 == pytest.approx(expected)
        assert row["train_state_gib"] < without["train_state_gib"] / 2  # a tiny model: adapters are 37% of it

    # BERT's token-classification head trains in full (peft's TOKEN_CLS): its weights leave the frozen count
    argv = ["plan", "bert", "--task", "token-classification", "--pp", "2", "--precision", precision, "--json"]
    assert main([*argv, "--lora-r", "8", "--lora-target-modules", "query", "value"]) == 0
    last = json.loads(capsys.readouterr().out)["stages"][-1]
    classifier = 64 * 3 + 3
    assert last["lora_trained_params"] == 2 * 2 * 8 * (64 + 64) + classifier
    expected = (last["params"] - classifier) * weight_bytes + last["lora_trained_params"] * per_param
    assert last["train_state_gib"] * 2**30 == pytest.approx(expected)


def test_plan_forecasts_activations_of_the_micro_batches_in_flight_and_checkpointing_shrinks_them(capsys):
    from pptk.parallel.activations import (
        BACKWARD_BLOCKS,
        attention_bytes_per_token,
        block_bytes_per_token,
        block_shape,
    )
    from pptk.parallel.pipeline import plan_pipeline

    argv = ["plan", "llama", "--pp", "2", "--seq-len", "32", "--micro-batch-size", "2", "--json"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*argv, "--activation-checkpoint-interval", "1"]) == 0
    checkpointed = json.loads(capsys.readouterr().out)
    assert plain["activations"] == {
        "seq_len": 32,
        "micro_batch_size": 2,
        "micro_batches": 4,
        "activation_checkpoint_interval": 0,
        "selective_checkpointing": False,
    }
    # stage 0 of 1F1B at pp=2 holds 2 micro-batches: its 2 blocks' saved tensors and the hidden state it sent
    config = plan_pipeline("llama", num_stages=2).config
    block = 2 * 32 * block_bytes_per_token(block_shape(config), seq_len=32, precision="bf16")
    hidden = 2 * 32 * 2 * config.hidden_size
    # and, once, a block's backward: gradients next to its saved set (BACKWARD_BLOCKS)
    backward = BACKWARD_BLOCKS * block
    assert plain["ranks"][0]["activation_gib"] * 2**30 == pytest.approx(2 * (2 * block + hidden) + backward)
    # checkpointed: each block's input kept instead, and one block recomputed at a time
    assert checkpointed["ranks"][0]["activation_gib"] * 2**30 == pytest.approx(2 * 3 * hidden + block + backward)
    # selective: each block keeps all but its attention's set; one attention is recomputed in the backward
    assert main([*argv, "--selective-checkpointing"]) == 0
    selective = json.loads(capsys.readouterr().out)
    attention = 2 * 32 * attention_bytes_per_token(block_shape(config), seq_len=32, precision="bf16")
    expected = 2 * (2 * (block - attention) + hidden) + attention + backward
    assert selective["ranks"][0]["activation_gib"] * 2**30 == pytest.approx(expected)
    for rank in plain["ranks"]:
        assert rank["total_gib"] == pytest.approx(rank["train_state_gib"] + rank["activation_gib"])
    assert main(["plan", "llama", "--pp", "2", "--activation-checkpoint-interval", "2"]) == 0
    out = capsys.readouterr().out
    assert "activation checkpointing every 2 blocks" in out and "stage 1:" in out and "+ activations" in out


def test_plan_shows_held_and_active_parameters_when_a_stage_has_experts(capsys):
    from pptk.cli.plan import print_active_parameters

    print_active_parameters([{"stage": 0, "params": 100}, {"stage": 1, "params": 200}])
    assert capsys.readouterr().out == ""
    print_active_parameters(
        [{"stage": 0, "params": 100, "active_params": 100}, {"stage": 1, "params": 400, "active_params": 100}]
    )
    out = capsys.readouterr().out
    assert "stage 0: 100 held, 100 active (100%)" in out and "stage 1: 400 held, 100 active (25%)" in out


def test_plan_needs_pp_or_gpus(capsys):
    assert main(["plan", "gpt2"]) == 2
    assert "pass --pp N for one layout's plan, or --gpus N" in capsys.readouterr().err
    assert main(["plan", "gpt2", "--gpus", "4", "--pp", "2"]) == 2
    assert "--gpus chooses pp, tp and dp itself: drop --pp, --tp and --dp" in capsys.readouterr().err
    assert main(["plan", "gpt2", "--gpus", "4", "--tp", "2"]) == 2
    assert "--gpus chooses pp, tp and dp itself" in capsys.readouterr().err
    assert main(["plan", "gpt2", "--gpus", "4", "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory 'lots': give a size such as 80GB" in capsys.readouterr().err


def test_plan_text_names_what_lora_trains(capsys):
    assert main(["plan", "gpt2", "--pp", "2", "--lora-r", "4"]) == 0
    out = capsys.readouterr().out
    assert "LoRA r=4: 16,384 parameters train" in out and "the frozen weights cost 2 bytes each" in out


@pytest.mark.parametrize(
    ("flags", "targets"),
    [
        ([], "all-linear"),
        (["--lora-target-modules", "all-linear"], "all-linear"),
        (["--lora-target-modules", "q_proj", "v_proj"], ("q_proj", "v_proj")),
        (["--lora-target-modules", "attn.c_attn"], ("attn.c_attn",)),  # a dotted name is a name
        (["--lora-target-modules", r".*\.(q|v)_proj"], r".*\.(q|v)_proj"),  # one value with regex syntax: peft's str
    ],
)
def test_lora_flags_become_the_settings(flags, targets):
    args = build_parser().parse_args(["verify", "llama", "--pp", "2", "--lora-r", "4", *flags])
    assert lora_settings(args) == LoraSettings(r=4, target_modules=targets)


def test_lora_shaping_flags_and_lora_off():
    argv = ["plan", "bert", "--pp", "2", "--lora-r", "16", "--lora-alpha", "8", "--lora-dropout", "0.1"]
    args = build_parser().parse_args([*argv, "--lora-modules-to-save", "pooler"])
    assert lora_settings(args) == LoraSettings(r=16, alpha=8.0, dropout=0.1, modules_to_save=("pooler",))
    assert lora_settings(build_parser().parse_args(["plan", "bert", "--pp", "2"])) is None


def test_models_lists_gpt2(capsys):
    assert main(["models", "--json"]) == 0
    rows = {row["model_type"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["gpt2"] == {
        "model_type": "gpt2",
        "tasks": ["causal-lm", "reward", "sequence-classification"],
        "tensor_parallel": True,
    }
    assert rows["phi3"]["tensor_parallel"] is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["verify", "gpt2", "--pp", "9"], "pp=9 stages but the model has only 4 blocks"),
        (["verify", "gpt2", "--pp", "2", "--zero-stage", "3"], "--zero-stage 3 with --pp 2: DeepSpeed's pipeline"),
        (["verify", "nosuchmodel", "--pp", "2"], "is not a local model directory, a config.json, or a supported"),
        (["verify", "gpt2", "--pp", "2", "--seq-len", "65"], "--seq-len 65 is longer than the model's 64 positions"),
        (
            ["verify", "gpt2", "--pp", "2", "--task", "masked-lm"],
            "--task masked-lm conflicts with gpt2 (small random "
            "config): no config.architectures, and gpt2 models "
            "support causal-lm, reward, sequence-classification; "
            "use --task causal-lm | reward | sequence-classification",
        ),
        (
            ["verify", "bert", "--pp", "2"],
            "cannot tell the task of bert (small random config) (bert, no "
            "config.architectures); pass --task masked-lm | sequence-classification | "
            "token-classification",
        ),
        (
            ["verify", "gpt2", "--pp", "2", "--precision", "fp16"],
            "--precision 'fp16': verify runs fp32 or bf16; fp16 needs a GPU",
        ),
        (["plan", "gpt2", "--pp", "2", "--partition-method", "flops"], "unknown partition method 'flops'"),
        # LoRA: what it cannot run with yet, and settings that select nothing
        (["verify", "gpt2", "--pp", "2", "--tp", "2", "--lora-r", "8"], "LoRA with tp(2) > 1 is not supported yet"),
        (["plan", "gpt2", "--pp", "2", "--tp", "2", "--lora-r", "8"], "LoRA with tp(2) > 1 is not supported yet"),
        (
            ["verify", "gpt2", "--pp", "2", "--lora-alpha", "32", "--lora-target-modules", "c_attn"],
            "--lora-alpha, --lora-target-modules without --lora-r: LoRA is off unless --lora-r",
        ),
        (
            ["verify", "gpt2", "--pp", "2", "--lora-r", "8", "--lora-target-modules", "q_proj"],
            "LoRA target_modules 'q_proj' matches no module of this model; its linear layers are: "
            "transformer.h.N.attn.c_attn",
        ),
        (
            [
                "plan",
                "bert",
                "--task",
                "token-classification",
                "--pp",
                "2",
                "--lora-r",
                "4",
                "--lora-modules-to-save",
                "pooler",
            ],
            "LoRA modules_to_save 'pooler' matches no module of this model",
        ),
    ],
)
def test_bad_input_exits_2_before_any_rank_starts(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"pptk {argv[0]}: error:")


# Every numeric flag of plan and verify, bad: one line naming the flag, the value and the range, and exit 2 (plan
# used to print a plan for world size -4, or a ZeroDivisionError traceback).
BAD_NUMBERS = [
    (["--pp", "0"], "--pp must be an integer >= 1, got 0"),
    (["--tp", "-2"], "--tp must be an integer >= 1, got -2"),
    (["--tp", "0"], "--tp must be an integer >= 1, got 0"),
    (["--dp", "0"], "--dp must be an integer >= 1, got 0"),
    (["--dp", "-1"], "--dp must be an integer >= 1, got -1"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be an integer >= 1, got 0"),
    (["--zero-stage", "4"], "--zero-stage must be an integer from 0 to 3, got 4"),
    (["--zero-stage", "-1"], "--zero-stage must be an integer from 0 to 3, got -1"),
    (["--seq-len", "0"], "--seq-len must be an integer >= 1, got 0"),
    (["--zero-stage", "2"], "--zero-stage 2 with --pp 2: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1"),
    (["--tp", "2", "--schedule", "dualpipev"], "--schedule dualpipev with --tp 2 is not supported yet"),
    (["--lora-r", "0"], "--lora-r must be an integer >= 1, got 0"),
    (["--lora-r", "8", "--lora-alpha", "0"], "--lora-alpha must be a finite number > 0, got 0.0"),
    (["--lora-r", "8", "--lora-dropout", "nan"], "--lora-dropout must be a finite number >= 0 and <= 1, got nan"),
]
VERIFY_BAD_NUMBERS = [
    (["--micro-batches", "0"], "--micro-batches must be an integer >= 1, got 0"),  # used to mean the default
    (["--micro-batches", "-3"], "--micro-batches must be an integer >= 1, got -3"),
    (
        ["--schedule", "dualpipev", "--micro-batches", "3"],
        "--schedule dualpipev with pp=2 needs at least 2 * pp = 4 micro-batches",
    ),
    (["--tolerance", "nan"], "--tolerance must be a finite number > 0, got nan"),
    (["--tolerance", "inf"], "--tolerance must be a finite number > 0, got inf"),
    (["--tolerance", "0"], "--tolerance must be a finite number > 0, got 0.0"),
    (["--tolerance=-1e-5"], "--tolerance must be a finite number > 0, got -1e-05"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 2147483647, got -1"),
    (["--seed", str(2**32)], f"--seed must be an integer from 0 to 2147483647, got {2**32}"),
]


@pytest.mark.parametrize(
    ("command", "flags", "message"),
    [("plan", flags, message) for flags, message in BAD_NUMBERS]
    + [("verify", flags, message) for flags, message in BAD_NUMBERS + VERIFY_BAD_NUMBERS],
)
def test_plan_and_verify_refuse_bad_numbers_in_one_line(command, flags, message, capsys):
    assert main([command, "gpt2", "--pp", "2", *flags]) == 2  # a flag given twice: the last wins
    captured = capsys.readouterr()
    assert captured.err.startswith(f"pptk {command}: error: {message}")
    assert captured.err.count("\n") == 1 and captured.out == ""


def test_plan_refuses_every_layout_verify_refuses(capsys):
    # the layouts pptk plan used to show although verify and the recipes refuse them
    for flags in (["--tp", "2", "--schedule", "dualpipev"], ["--zero-stage", "3"], ["--tp", "-2"], ["--dp", "0"]):
        codes = [main([command, "gpt2", "--pp", "2", *flags]) for command in ("plan", "verify")]
        errors = [line.split(": error: ")[1] for line in capsys.readouterr().err.splitlines()]
        assert codes == [2, 2] and errors[0] == errors[1], flags


def _subcommand_parsers(parser, prefix=""):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield prefix + name, child
                yield from _subcommand_parsers(child, prefix + name + " ")


def test_every_subcommand_help_ends_with_an_example():
    from pptk.cli import build_parser

    for name, child in _subcommand_parsers(build_parser()):
        last = child.format_help().rstrip().splitlines()[-1].strip()
        assert last.startswith("pptk " + name.split()[0]), f"pptk {name} --help ends with {last!r}, not an example"


def test_top_level_help_lists_each_subcommand_on_one_line():
    from pptk.cli import build_parser

    parser = build_parser()
    lines = parser.format_help().splitlines()
    for name, _ in _subcommand_parsers(parser):
        if " " in name:
            continue
        rows = [line for line in lines if line.strip().startswith(name + " ")]
        assert len(rows) == 1 and len(rows[0].split()) > 2, f"pptk --help: no one-line description of {name}"


def test_tools_print_no_deepspeed_startup_notice():
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # DeepSpeed then detects (and announces)
    pptk = str(Path(sys.executable).parent / "pptk")
    done = subprocess.run([pptk, "models"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "gpt2" in done.stdout
    assert "accelerator" not in (done.stdout + done.stderr).lower(), done.stderr
