# A checkpoint file damaged in place (same size) is named before it is read; a full disk while the manifest or
# `latest` is written leaves `latest` on the previous checkpoint.
import argparse
import hashlib
import re
import resource
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pptk.checkpoints.convert import ds_to_hf, hf_to_ds, load_sequential_from_checkpoint
from pptk.checkpoints.integrity import FileLedger, check_files, expected_checkpoint_bytes, format_bytes
from pptk.checkpoints.safe_writes import publish
from pptk.checkpoints.training import check_layer_files, read_manifest
from pptk.cli import checkpoint as checkpoint_cli
from pptk.errors import PptkError

FIXTURE_V0 = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v0"


def zero_tensor_bytes(path: Path, count: int = 1024) -> None:
    """Zero ``count`` bytes inside the largest tensor of a torch archive, in place: the file keeps its size and
    stays a valid archive, as after a bad disk sector or a faulty copy."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)  # the local header's name and extra-field lengths
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        f.seek(record.header_offset + 30 + name_length + extra_length)
        f.write(bytes(min(count, record.file_size)))


def verify(directory: Path) -> int:
    """`pptk checkpoint verify DIR`, through the module's own parser (pptk's main prints a PptkError as one line)."""
    parser = argparse.ArgumentParser(prog="pptk")
    checkpoint_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["checkpoint", "verify", str(directory)])
    return args.func(args)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A small GPT-2 and its pipeline checkpoints at tp=1 and tp=2 (one file per layer and tp rank)."""
    root = tmp_path_factory.mktemp("integrity")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(root / "hf")
    for tp in (1, 2):
        hf_to_ds(root / "hf", root / f"tp{tp}", tp=tp)
    return root


@pytest.fixture
def checkpoint(converted, tmp_path):
    """A copy of the tp=1 checkpoint, free to damage."""
    shutil.copytree(converted / "tp1", tmp_path / "ds")
    return tmp_path / "ds"


@pytest.mark.parametrize("tp", [1, 2])
def test_every_file_a_conversion_writes_has_its_size_and_sha256_in_the_manifest(converted, tp, capsys):
    tag = converted / f"tp{tp}" / "step0"
    recorded = read_manifest(tag)["files"]
    assert sorted(recorded) == sorted(p.name for p in tag.iterdir() if p.name != "pptk.json")
    assert len([name for name in recorded if name.startswith("layer_01-")]) == tp
    for name, entry in recorded.items():
        assert entry == {
            "size": (tag / name).stat().st_size,
            "sha256": hashlib.sha256((tag / name).read_bytes()).hexdigest(),
        }
    total = sum(entry["size"] for entry in recorded.values())
    assert expected_checkpoint_bytes(converted / f"tp{tp}", params=0) == total + (tag / "pptk.json").stat().st_size
    assert verify(converted / f"tp{tp}") == 0
    summary = f"{tag}: {len(recorded)} files, {format_bytes(total)}: sizes and sha256 checksums match"
    assert capsys.readouterr().out.strip() == summary


def test_bytes_zeroed_inside_a_layer_file_are_named_by_resume_export_and_verify(checkpoint, tmp_path):
    tag = checkpoint / "step0"
    layer = tag / "layer_03-model_states.pt"
    before, size = torch.load(layer), layer.stat().st_size
    zero_tensor_bytes(layer)
    after = torch.load(layer)  # still a valid archive of the same size: only the weights changed
    assert layer.stat().st_size == size and any(not torch.equal(before[k], after[k]) for k in before)
    damaged = r"checkpoint step0 \(.*step0\) is damaged: layer_03-model_states.pt does not match the sha256 recorded"
    with pytest.raises(PptkError, match=damaged + r".*; use an earlier step, or copy the checkpoint again"):
        check_layer_files(tag)  # what the trainer runs on every rank before any process group
    with pytest.raises(PptkError, match=damaged):
        ds_to_hf(checkpoint, tmp_path / "export")
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export*"))
    with pytest.raises(PptkError, match=damaged):
        verify(checkpoint)
    with pytest.raises(PptkError, match=damaged):
        load_sequential_from_checkpoint(checkpoint)
    # two ranks split the hashing: exactly one of them reads the damaged file
    outcomes = []
    for rank in (0, 1):
        try:
            check_files(tag, read_manifest(tag), share=(rank, 2))
            outcomes.append("ok")
        except PptkError:
            outcomes.append("damaged")
    assert sorted(outcomes) == ["damaged", "ok"]


def test_a_truncated_or_missing_file_is_named_by_its_size_on_every_rank(checkpoint):
    tag = checkpoint / "step0"
    for step in ("step12", "step40"):  # an earlier step to go back to, named in the fix, and a later one, not named
        shutil.copytree(tag, checkpoint / step)
    tag = tag.rename(checkpoint / "step20")
    layer = tag / "layer_00-model_states.pt"
    layer.write_bytes(layer.read_bytes()[:1000])
    (tag / "layer_04-model_states.pt").unlink()
    with pytest.raises(
        PptkError,
        match=r"layer_00-model_states.pt is 1,000 bytes, saved as [\d,]+ \(truncated or overwritten\); "
        r"layer_04-model_states.pt is missing; use an earlier step \(step12 beside it\), or copy the checkpoint again$",
    ):
        check_files(tag, read_manifest(tag), share=(1, 8))  # sizes are every rank's, whatever its share


def test_a_checkpoint_from_pptk_0_1_0_has_no_checksums_and_still_verifies_and_exports(tmp_path, capsys):
    shutil.copytree(FIXTURE_V0 / "checkpoints", tmp_path / "checkpoints")
    tag = tmp_path / "checkpoints" / "step4"
    assert "files" not in read_manifest(tag)
    assert verify(tmp_path / "checkpoints") == 0
    count = len(list(tag.glob("*.pt")))
    assert (
        f"{count} files, " in (out := capsys.readouterr().out) and "whole torch archives (no checksums recorded)" in out
    )
    check_layer_files(tag)
    ds_to_hf(tmp_path / "checkpoints", tmp_path / "export", tokenizer=FIXTURE_V0 / "model")
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "export").config.n_layer == 2
    layer = tag / "layer_02-model_states.pt"
    layer.write_bytes(layer.read_bytes()[:-100])
    with pytest.raises(PptkError, match=r"checkpoint step4 .* has truncated or corrupt files \(layer_02-model_states"):
        verify(tmp_path / "checkpoints")


def test_a_failed_write_is_recorded_and_nothing_more_is_written(tmp_path):
    """/dev/full fails every write with ENOSPC, as a full disk does; torch.save reports it as a RuntimeError."""
    files = FileLedger(tmp_path)
    files.save({"w": torch.ones(4)}, tmp_path / "first.pt")
    (tmp_path / "second.pt").symlink_to("/dev/full")
    files.save({"w": torch.ones(100_000)}, tmp_path / "second.pt")
    files.save({"w": torch.ones(4)}, tmp_path / "third.pt")
    assert list(files.files) == ["first.pt"]
    assert files.failure is not None and files.failure.describe() == (
        "second.pt: torch could not write it (a full disk or a quota)"
    )
    assert not (tmp_path / "second.pt").exists() and not (tmp_path / "third.pt").exists()

    (tmp_path / "text").symlink_to("/dev/full")
    plain = FileLedger(tmp_path)
    plain.write(tmp_path / "text", lambda: (tmp_path / "text").write_text("x" * 10_000))
    assert plain.failure is not None and plain.failure.describe() == "text: No space left on device"
    with pytest.raises(RuntimeError, match="not a write"):  # any other error is a bug, not a full disk
        FileLedger(tmp_path).write(tmp_path / "x", lambda: (_ for _ in ()).throw(RuntimeError("not a write")))


@pytest.mark.parametrize("full", ["step4.partial/pptk.json.tmp", "latest.tmp"])
def test_a_full_disk_while_the_manifest_or_latest_is_written_keeps_latest_on_the_previous_checkpoint(tmp_path, full):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step2").mkdir(parents=True)
    (checkpoints / "latest").write_text("step2")
    (checkpoints / "step4.partial").mkdir()
    (checkpoints / "step4.partial" / "layer_00-model_states.pt").write_bytes(b"weights")
    (checkpoints / full).symlink_to("/dev/full")
    writing = "latest" if full == "latest.tmp" else "pptk.json"
    with pytest.raises(
        PptkError,
        match=rf"could not finish checkpoint step4 in {checkpoints}: writing {writing} failed \(No space left on "
        r"device\); step4 was removed and latest \(step2\) is intact; free space there",
    ):
        publish(checkpoints / "step4.partial", checkpoints / "step4", {"step": 4})
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step2"]
    assert (checkpoints / "latest").read_text() == "step2"


def test_hf_to_ds_under_a_file_size_limit_names_the_file_and_leaves_nothing(converted, tmp_path):
    """A real limit (RLIMIT_FSIZE, as ``ulimit -f``, for the length of the call; Python ignores SIGXFSZ, so the
    kernel fails the write with EFBIG as it fails one with ENOSPC on a full disk): torch.save raises its RuntimeError
    on the largest layer files."""
    largest = max(p.stat().st_size for p in (converted / "tp1" / "step0").glob("layer_*"))
    dst = tmp_path / "ds"
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (largest - 1, before[1]))
    try:
        with pytest.raises(PptkError) as raised:
            hf_to_ds(converted / "hf", dst)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
    assert re.fullmatch(
        rf"could not write step0.partial in {dst}: layer_\d\d-model_states.pt: file too large: this process may "
        rf"write files of at most {largest - 1:,} bytes; the layer files need about [\d.]+ KiB there: raise the "
        r"limit \(ulimit -f unlimited\) and convert again",
        str(raised.value),
    ), raised.value
    assert list(dst.iterdir()) == []
