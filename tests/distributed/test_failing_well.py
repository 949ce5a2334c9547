# Failing well through the real `deepspeed` launcher: one line per failure, nothing half-written, no orphan ranks.
import json
import os
import re
import resource
import signal
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import DEMO_CACHE, ROOT, VENV_BIN, free_port, recipe_env, run_recipe

from pptk.checkpoints.integrity import file_record

pytestmark = pytest.mark.dist
QUICK = ["--demo", "--log-every", "1", "--eval-every", "1000", "--wandb-mode", "disabled", "--micro-batch-size", "2"]
QUICK += ["--data-cache", str(DEMO_CACHE)]  # the demo's tokenizer and set, prepared once per session


def _pids_running(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def _rank_pid(marker: str, rank: int) -> int:
    """The pid of global rank ``rank`` of the launch whose command line holds ``marker``."""
    for pid in _pids_running(marker):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no rank {rank} running for {marker}")


def _zero_tensor_bytes(path: Path, count: int = 1024) -> None:
    """Zero ``count`` bytes inside the largest tensor of a torch archive, in place: the file keeps its size and
    stays a valid archive, as after a bad disk sector or a faulty copy."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)  # the local header's name and extra-field lengths
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        f.seek(record.header_offset + 30 + name_length + extra_length)
        f.write(bytes(min(count, record.file_size)))


# Above every other file rank 0 writes (metrics.jsonl), below its largest checkpoint files (the 2 MiB embedding).
FILE_SIZE_LIMIT = 2**20


@pytest.fixture(scope="module")
def disk_full_run(tmp_path_factory):
    """Saves every 2 steps. Once the first checkpoint is there, rank 0 gets a real file size limit (RLIMIT_FSIZE,
    set from outside with prlimit; Python ignores SIGXFSZ, so the kernel fails the write with EFBIG as it fails one
    with ENOSPC on a full disk), and its next save fails inside DeepSpeed's own torch.save, which raises torch's
    RuntimeError. Nothing is injected into pptk. Returns (output dir, exit code, stdout and stderr)."""
    out = tmp_path_factory.mktemp("disk-full")
    log = tmp_path_factory.mktemp("disk-full-log") / "output.txt"
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "recipes" / "gpt_pretrain.py"), "--output-dir", str(out), *QUICK,
           "--max-steps", "400", "--save-every", "2"]  # fmt: skip
    with open(log, "w") as sink:  # a file, not a pipe: nobody reads a pipe while the test waits
        runner = subprocess.Popen(cmd, cwd=ROOT, env=recipe_env(), stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not (out / "checkpoints" / "latest").exists():
                assert runner.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            limit = (FILE_SIZE_LIMIT, resource.RLIM_INFINITY)
            resource.prlimit(_rank_pid(str(out), 0), resource.RLIMIT_FSIZE, limit)
            runner.wait(timeout=240)
        finally:
            for pid in _pids_running(str(out)):
                os.kill(pid, signal.SIGKILL)
            runner.kill()
    return out, runner.returncode, log.read_text()


def test_a_full_disk_at_save_is_one_line_and_keeps_the_previous_checkpoint(disk_full_run):
    out, code, text = disk_full_run
    ckpt = out / "checkpoints"
    kept = (ckpt / "latest").read_text().strip()
    failed = f"step{int(kept.removeprefix('step')) + 2}"  # the first save after the limit: the one after latest
    assert code == 2, text[-3000:]
    errors = [line for line in text.splitlines() if "gpt_pretrain: error:" in line]
    assert len(errors) == 1, text[-3000:]
    assert re.search(
        rf"rank 0: could not write checkpoint {failed}: [\w-]+\.pt: file too large: this process may write files of "
        rf"at most 1,048,576 bytes; one checkpoint needs about [\d.]+ MiB in {ckpt} \([\d.]+ \w+ free\): raise the "
        rf"limit \(ulimit -f unlimited\) and resume from latest \({kept}\), which is intact$",
        errors[0],
    ), errors[0]
    assert "rank 1: stopping: another rank failed (its error is above)" in text
    assert "Traceback" not in text, text[-3000:]
    assert not list(ckpt.glob("*.partial")) and not (ckpt / failed).exists()
    assert not (out / ".pptk.lock").exists()  # released on the way out
    # every file of the kept checkpoint, DeepSpeed's own included, has its size and checksum in the manifest
    recorded = json.loads((ckpt / kept / "pptk.json").read_text())["files"]
    assert sorted(recorded) == sorted(p.name for p in (ckpt / kept).iterdir() if p.name != "pptk.json")
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_01_optim_states.pt", "rng_rank1.pt"} <= set(recorded)
    assert all(entry["sha256"] == file_record(ckpt / kept / name)["sha256"] for name, entry in recorded.items())


def test_a_layer_file_damaged_in_place_is_named_before_any_rank_starts(disk_full_run, tmp_path):
    """1 KiB zeroed inside a layer's weights: the file keeps its size and still loads, with other weights."""
    out, _, _ = disk_full_run
    tag = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    _zero_tensor_bytes(tag / "layer_03-model_states.pt")
    steps = int(tag.name.removeprefix("step")) + 2
    run = run_recipe("gpt_pretrain.py", [*QUICK, "--max-steps", str(steps), "--resume-from", str(out / "checkpoints")],
                     output_dir=tmp_path / "resumed", timeout=200)  # fmt: skip
    text = run.stdout + run.stderr
    assert run.returncode != 0 and "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if "gpt_pretrain: error:" in line]
    assert len(errors) == 1, text[-3000:]  # the rank whose share of the hashing held the file
    assert f"checkpoint {tag.name} ({tag}) is damaged: layer_03-model_states.pt does not match the sha256" in errors[0]
    assert "Using topology" not in text  # refused before the process group and the engine


def test_a_second_run_on_the_same_output_dir_is_refused(disk_full_run, tmp_path):
    out, _, _ = disk_full_run
    run = run_recipe("gpt_pretrain.py", [*QUICK, "--max-steps", "2"], output_dir=out, timeout=200)
    assert run.returncode == 2 and "already holds a run" in run.stderr and "Traceback" not in run.stderr


def test_sigterm_to_the_launcher_leaves_no_rank_running(tmp_path):
    """A scheduler that signals only `deepspeed` (the runner): on one node it forwards nothing, so the ranks must
    notice on their own (pptk.launch.watch)."""
    out = tmp_path / "signalled"
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "recipes" / "gpt_pretrain.py"), "--output-dir", str(out), *QUICK,
           "--max-steps", "400"]  # fmt: skip
    runner = subprocess.Popen(cmd, cwd=ROOT, env=recipe_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists():  # training has started on every rank
            assert runner.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.5)
        assert len(_pids_running(str(out))) >= 3  # the runner, DeepSpeed's launch, 2 ranks
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _pids_running(str(out)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _pids_running(str(out)), "ranks (or DeepSpeed's launch) outlived the launcher"
        logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        time.sleep(2)
        assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == logged
    finally:
        for pid in _pids_running(str(out)):
            os.kill(pid, signal.SIGKILL)
        runner.kill()


def test_non_finite_weights_are_never_saved(tmp_path):
    """Rank 1's weights turn NaN before the step-4 save (the loss of step 4 was still finite): rank 0 reports it in
    one line naming rank 1, nothing is written, and latest stays on step 2."""
    out = tmp_path / "nan"
    env = dict(recipe_env(), PPTK_FAILPOINT="nan:1:4")
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "recipes" / "gpt_pretrain.py"), "--output-dir", str(out), *QUICK,
           "--max-steps", "6", "--save-every", "2"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    text = run.stdout + run.stderr
    assert run.returncode != 0
    errors = [line for line in text.splitlines() if "gpt_pretrain: error:" in line]
    assert len(errors) == 1, text[-3000:]
    assert "rank 0: the weights at step 4 are not finite (NaN or inf) on rank(s) [1]: not saved" in errors[0]
    assert "latest (step2) is the last good checkpoint" in errors[0]
    assert "rank 1: stopping: another rank failed" in text and "Traceback" not in text, text[-3000:]
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step2"
    assert not (ckpt / "step4").exists() and not list(ckpt.glob("*.partial"))


def test_a_huge_learning_rate_is_stopped_before_a_blown_up_state_is_saved(tmp_path):
    """DeepSpeed's LR range test scheduler (staircase) makes 14 updates at lr 1e-3, then jumps to ~100. Saving every
    step, the save after the first huge update (step 15) is skipped: that step's loss, measured before its update,
    was fine, but the updated weights' own loss spikes. The next bad steps are not saved either, and three in a row
    stop the run in one line. latest is step 14, the last good weights, as small as they were."""
    config = json.loads((ROOT / "ds_configs" / "pipe_zero1_cpu.json").read_text())
    config["scheduler"] = {
        "type": "LRRangeTest",
        "params": {
            "lr_range_test_min_lr": 1e-3,
            "lr_range_test_step_size": 14,
            "lr_range_test_step_rate": 1e5,
            "lr_range_test_staircase": True,
        },
    }
    (tmp_path / "range_test.json").write_text(json.dumps(config))
    out = tmp_path / "huge-lr"
    run = run_recipe("gpt_pretrain.py", [*QUICK, "--max-steps", "30", "--save-every", "1", "--ds-config",
                                          str(tmp_path / "range_test.json")], output_dir=out, timeout=300)  # fmt: skip
    text = run.stdout + run.stderr
    assert run.returncode == 2, text[-3000:]
    errors = [line for line in text.splitlines() if "gpt_pretrain: error:" in line]
    assert len(errors) == 1 and "rank 0: the loss is diverging" in errors[0] and "Traceback" not in text, text[-3000:]
    assert "rank 1: stopping: another rank failed" in text
    assert "the updated weights give loss" in text  # the check before the save caught the first huge update
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    # the lr logged at step s is the one the update of step s + 1 uses
    assert lrs[13] == pytest.approx(1e-3) and lrs[14] > 10 and records[-1]["loss"] > 1e3
    ckpt = out / "checkpoints"
    latest = (ckpt / "latest").read_text().strip()
    assert latest == "step14", sorted(p.name for p in ckpt.iterdir())
    assert not list(ckpt.glob("step1[5-9]*")) and not list(ckpt.glob("step[2-3]?"))
    largest = max(t.abs().max().item() for p in (ckpt / latest).glob("layer_*") for t in torch.load(p).values())
    first = max(t.abs().max().item() for p in (ckpt / "step1").glob("layer_*") for t in torch.load(p).values())
    assert largest < 2 * first, (largest, first)
