# One run per --output-dir, no silent overwrite of a finished run, and converters that never mix old and new files.
import json
import socket
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pptk.checkpoints.convert import check_export_destination, ds_to_hf, hf_to_ds
from pptk.errors import PptkError
from pptk.training.run_dir import LOCK_FILE, claim_output_dir, release_output_dir, run_identity


def _lock(path, *, run, pid, host=None):
    path.mkdir(parents=True, exist_ok=True)
    holder = {"run": run, "pid": pid, "host": host or socket.gethostname(), "started": 0}
    (path / LOCK_FILE).write_text(json.dumps(holder))


def _dead_pid():
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_fresh_directory_is_claimed_once_per_launch_and_released(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "node1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    out = tmp_path / "run"
    assert claim_output_dir(out, resuming=False, overwrite=False) is True  # the first rank writes the lock
    assert claim_output_dir(out, resuming=False, overwrite=False) is False  # another rank of the same launch
    assert json.loads((out / LOCK_FILE).read_text())["run"] == run_identity() == "node1:29500"
    release_output_dir(out)
    assert not (out / LOCK_FILE).exists()


def test_a_second_live_run_is_refused_naming_the_holder(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29501")
    _lock(tmp_path, run="localhost:29500", pid=subprocess.os.getppid())
    with pytest.raises(PptkError, match=r"another run is using .* \(pid \d+ on .*\); wait for it"):
        claim_output_dir(tmp_path, resuming=False, overwrite=False)
    _lock(tmp_path, run="localhost:29500", pid=1, host="other-node")
    with pytest.raises(PptkError, match=rf"delete {tmp_path / LOCK_FILE} if that run is over"):
        claim_output_dir(tmp_path, resuming=True, overwrite=False)


def test_a_stale_lock_from_a_dead_process_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29502")
    _lock(tmp_path, run="localhost:29500", pid=_dead_pid())
    assert claim_output_dir(tmp_path, resuming=False, overwrite=False) is True


def test_a_finished_run_is_resumed_or_overwritten_never_silently_mixed(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29503")
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(PptkError, match="already holds a run \\(summary.json\\); continue it with --resume-from"):
        claim_output_dir(tmp_path, resuming=False, overwrite=False)
    assert not (tmp_path / LOCK_FILE).exists()  # a refused run leaves no lock behind
    assert claim_output_dir(tmp_path, resuming=True, overwrite=False)
    release_output_dir(tmp_path)
    assert claim_output_dir(tmp_path, resuming=False, overwrite=True)


def test_an_output_dir_that_cannot_be_written_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(PptkError, match="cannot be written .*; choose a directory you can write to"):
        claim_output_dir(tmp_path / "file" / "run", resuming=False, overwrite=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(root / "hf")
    hf_to_ds(root / "hf", root / "ds")
    return root


def test_hf_to_ds_never_repoints_a_runs_latest_without_overwrite(checkpoint, tmp_path):
    with pytest.raises(PptkError, match="already holds checkpoints \\(step0, latest\\).*restart from zero"):
        hf_to_ds(checkpoint / "hf", checkpoint / "ds")
    assert (checkpoint / "ds" / "latest").read_text().strip() == "step0"
    hf_to_ds(checkpoint / "hf", checkpoint / "ds", overwrite=True)
    assert sorted(p.name for p in (checkpoint / "ds").iterdir()) == ["latest", "step0"]


def test_ds_to_hf_replaces_an_older_sharded_export_whole(checkpoint, tmp_path):
    out = tmp_path / "export"
    ds_to_hf(checkpoint / "ds", out, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
    with pytest.raises(PptkError, match="is not empty .*pass --overwrite to replace it"):
        ds_to_hf(checkpoint / "ds", out)
    ds_to_hf(checkpoint / "ds", out, overwrite=True)  # one shard now: the old shards and index must be gone
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert not list(tmp_path.glob(".export.*"))  # no partial or old copy left beside it
    reloaded = GPT2LMHeadModel.from_pretrained(out)
    original = GPT2LMHeadModel.from_pretrained(checkpoint / "hf")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), original.state_dict().values()))


def test_overwrite_replaces_only_a_previous_export(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PptkError, match="not a Hugging Face export"):
        check_export_destination(tmp_path, overwrite=True)


def test_a_disk_that_cannot_hold_one_checkpoint_is_refused_before_training(tmp_path):
    import shutil

    from pptk.checkpoints.integrity import CHECKPOINT_BYTES_PER_PARAM
    from pptk.training.run_dir import check_free_space

    free = shutil.disk_usage(tmp_path).free
    fits = free // CHECKPOINT_BYTES_PER_PARAM // 2
    check_free_space(tmp_path / "run" / "checkpoints", params=fits)  # not created yet: its file system is measured
    too_big = free // CHECKPOINT_BYTES_PER_PARAM + 10**9
    with pytest.raises(PptkError, match=rf"needs about [\d.]+ GiB, and {tmp_path} has [\d.]+ GiB free; free space"):
        check_free_space(tmp_path / "run" / "checkpoints", params=too_big)
    assert not (tmp_path / "run").exists()
    # resuming there: the newest checkpoint's own size counts, not the estimate (a sparse file takes no space)
    (tmp_path / "checkpoints" / "step2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step2")
    with open(tmp_path / "checkpoints" / "step2" / "optim_layer_00.pt", "wb") as f:
        f.truncate(free + 10**9)
    with pytest.raises(PptkError, match="needs about"):
        check_free_space(tmp_path / "checkpoints", params=1)
