# Prepared sets that went wrong: damaged files (training refuses them, prepare rebuilds them), what a killed
# prepare leaves behind, and inputs whose text has the wrong type.
import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from pptk.data.blocks import open_prepared
from pptk.data.integrity import SAMPLE_BYTES, SAMPLE_CHUNKS, file_checksums, find_damage, full_sha256
from pptk.data.prepare import prepare_files
from pptk.data.workers import encode_in_workers
from pptk.errors import PptkError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v0"
TOKENIZER_DIR = FIXTURE / "model"
DOCS = [d for d in (FIXTURE / "data.txt").read_text().split("\n\n") if d.strip()][:120]
PPTK = str(Path(sys.executable).parent / "pptk")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in DOCS[:30]))
    return path


@pytest.fixture
def pptk_lines():
    """What pptk logs, caught on its own logger (setup_logging stops it propagating to caplog's root handler)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("pptk")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def _flip_a_byte(file: Path, at: int) -> None:
    data = bytearray(file.read_bytes())
    data[at] ^= 0xFF
    file.write_bytes(bytes(data))


def test_a_truncated_set_is_refused_by_training_and_rebuilt_by_prepare(source, tokenizer, tmp_path, pptk_lines):
    out = tmp_path / "set"
    first = prepare_files([source], tokenizer=tokenizer, out=out)
    tokens = (out / "tokens.bin").read_bytes()
    assert first.manifest["checksums"]["tokens.bin"]["sha256"] == full_sha256(out / "tokens.bin")
    (out / "tokens.bin").write_bytes(tokens[:-10])
    with pytest.raises(PptkError, match=r"tokens.bin has \d+ bytes, its manifest says \d+; the set is damaged"):
        open_prepared(out)
    again = prepare_files([source], tokenizer=tokenizer, out=out)
    assert not again.reused
    assert [line for line in pptk_lines if "tokens.bin has" in line and line.endswith("; preparing it again")]
    assert (out / "tokens.bin").read_bytes() == tokens and open_prepared(out).num_documents == 30
    assert prepare_files([source], tokenizer=tokenizer, out=out).reused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "set"]


def test_a_changed_byte_is_found_by_the_sampled_check_of_a_small_set_and_by_prepare(source, tokenizer, tmp_path):
    out = tmp_path / "set"
    prepare_files([source], tokenizer=tokenizer, out=out)
    _flip_a_byte(out / "documents.idx", 8 * 7)  # same size, first and last offsets intact
    with pytest.raises(PptkError, match="the content of documents.idx differs from the checksum its manifest"):
        open_prepared(out)
    assert not prepare_files([source], tokenizer=tokenizer, out=out).reused
    open_prepared(out)


def test_the_quick_check_samples_a_large_file_and_the_full_check_reads_every_byte(tmp_path):
    """Training's check reads 16 chunks of a large file, so a byte between them passes it; prepare's does not."""
    num_tokens = SAMPLE_CHUNKS * SAMPLE_BYTES  # 2 MiB as uint16: larger than the 16 samples
    np.arange(num_tokens, dtype=np.uint16).tofile(tmp_path / "tokens.bin")
    np.array([0, num_tokens], dtype=np.int64).tofile(tmp_path / "documents.idx")
    manifest = {
        "tokens_file": "tokens.bin",
        "index_file": "documents.idx",
        "dtype": "uint16",
        "num_tokens": num_tokens,
        "num_documents": 1,
        "checksums": {
            n: file_checksums(tmp_path / n, full_sha256(tmp_path / n)) for n in ("tokens.bin", "documents.idx")
        },
    }
    assert find_damage(tmp_path, manifest, full=True) is None
    _flip_a_byte(tmp_path / "tokens.bin", SAMPLE_BYTES + 10)  # after the first chunk, before the second
    assert find_damage(tmp_path, manifest, full=False) is None
    assert "content of tokens.bin differs" in find_damage(tmp_path, manifest, full=True)
    _flip_a_byte(tmp_path / "tokens.bin", 10)  # inside the first chunk
    assert "content of tokens.bin differs" in find_damage(tmp_path, manifest, full=False)
    np.array([0, num_tokens - 1], dtype=np.int64).tofile(tmp_path / "documents.idx")
    assert "documents.idx spans tokens [0, 1048575), its manifest says [0, 1048576)" in find_damage(
        tmp_path, manifest, full=False
    )
    assert find_damage(tmp_path, {"dtype": "uint16"}, full=False).startswith("its manifest lacks tokens_file")


def test_a_set_from_before_checksums_still_trains_and_prepare_rebuilds_it(source, tokenizer, tmp_path, pptk_lines):
    out = tmp_path / "set"
    prepare_files([source], tokenizer=tokenizer, out=out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["checksums"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert open_prepared(out).num_documents == 30  # sizes and offsets checked, nothing more to check
    again = prepare_files([source], tokenizer=tokenizer, out=out)
    assert not again.reused and "checksums" in again.manifest
    assert [line for line in pptk_lines if "has no checksums (an older pptk made it), so it cannot be verified" in line]


def test_leftovers_of_dead_prepares_on_this_host_are_removed_others_kept(source, tokenizer, tmp_path, pptk_lines):
    dead = subprocess.Popen([sys.executable, "-c", ""])  # its pid no longer runs once it is waited for
    dead.wait()
    host = socket.gethostname()
    removed = [f"set.partial-{host}-{dead.pid}", f"set.stale-{host}-{dead.pid}", f"set.partial-{dead.pid}"]
    kept = [f"set.partial-{host}-1", f"set.partial-another-host-{dead.pid}", "set.partial-notes"]  # 1: init, alive
    for name in removed + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokens.bin").write_bytes(b"half")
    prepare_files([source], tokenizer=tokenizer, out=tmp_path / "set")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["docs.jsonl", "set", *kept])
    assert sum("left by a prepare that no longer runs" in line for line in pptk_lines) == len(removed)


def test_kill_9_of_prepare_leaves_no_partial_after_the_next_run_and_its_workers_leave_quietly(tmp_path):
    big = tmp_path / "big.jsonl"
    with big.open("w") as f:
        while f.tell() < 8 << 20:  # 8 MiB: batches of 1 MiB, so it is still running after the first is written
            f.writelines(json.dumps({"text": doc}) + "\n" for doc in DOCS)
    out = tmp_path / "set"
    command = [PPTK, "data", "prepare", "--tokenizer", str(TOKENIZER_DIR), "--out", str(out), "--workers", "2"]
    killed = subprocess.Popen([*command, str(big)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not any(p.stat().st_size for p in tmp_path.glob("set.partial-*/tokens.bin")):  # workers are answering
        assert killed.poll() is None, killed.communicate()
    killed.kill()
    # The workers hold the same stdout and stderr: their ends (EOF) mean every worker has left too.
    _, stderr = killed.communicate(timeout=60)
    assert killed.returncode == -9
    assert "Traceback" not in stderr and "Error" not in stderr and "leaked" not in stderr, stderr
    assert [p.name for p in tmp_path.glob("set.*")] == [f"set.partial-{socket.gethostname()}-{killed.pid}"]

    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in DOCS[:10]))
    done = subprocess.run([*command, str(small)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"removed '{tmp_path}/set.partial-" in done.stdout and "wrote (10 documents" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl", "set", "small.jsonl"]

    assert open_prepared(out).num_documents == 10


def _workers() -> list:
    """This process's live tokenizer workers (other tests' exited children may linger as zombies)."""
    import psutil

    found = []
    for child in psutil.Process().children():
        try:
            if "pptk.data.workers" in child.cmdline():
                found.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return found


def test_a_worker_killed_mid_run_is_one_error_naming_it_not_a_hang(tokenizer):
    def batches():
        for number in range(6):
            if number == 2:  # both workers hold a batch: kill them as an out-of-memory killer would
                for child in _workers():
                    child.kill()
            yield number, DOCS[:20]

    tokenizer_json = tokenizer.backend_tokenizer.to_str()
    with pytest.raises(PptkError, match=r"tokenizer worker \d+ died \(exit code -9; .* fewer --workers"):
        list(encode_in_workers(batches(), tokenizer_json=tokenizer_json, workers=2))
    assert not _workers()


# --- text of the wrong type -----------------------------------------------------------------------------------------


def test_text_of_another_type_is_named_with_the_fix(tokenizer, tmp_path):
    cases = {
        "int.jsonl": (
            b'{"text": 123}\n',
            r"line 1: field 'text' holds a JSON number \(123\), not a string; .*--text-field",
        ),
        "list.jsonl": (
            b'{"text": ["a", "b"]}\n',
            r"field 'text' holds a JSON array \(\[\"a\", \"b\"\]\), not a string",
        ),
        "null.jsonl": (b'{"text": null}\n', r"field 'text' holds a JSON null"),
        "array.jsonl": (b'["text"]\n', r"line 1 is a JSON array, not an object with a field 'text'; .jsonl wants one"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(PptkError, match=message):
            prepare_files([tmp_path / name], tokenizer=tokenizer, out=tmp_path / "out")
    pq.write_table(pa.table({"text": [1, 2], "body": ["a", "b"], "title": ["t", "u"]}), tmp_path / "ints.parquet")
    with pytest.raises(
        PptkError,
        match=r"column 'text' has type int64, not text \(string\); pass --text-field NAME of a string column "
        r"\(its string columns: body, title\)",
    ):
        prepare_files([tmp_path / "ints.parquet"], tokenizer=tokenizer, out=tmp_path / "out")
    pq.write_table(pa.table({"text": pa.array(["x y z"]).dictionary_encode()}), tmp_path / "dict.parquet")
    assert (
        prepare_files([tmp_path / "dict.parquet"], tokenizer=tokenizer, out=tmp_path / "out").manifest["num_documents"]
        == 1
    )
