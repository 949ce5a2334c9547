# Prepared token sets: `pptk data prepare` (inputs, workers, no-op re-runs, atomic output, errors), memory-mapped
# reading, the split by document, blending and the constant-memory block order.
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from pptk.data.blocks import Blocks, blend, open_prepared, permute, split_by_document
from pptk.data.corpus import build_corpus, collect_sets, document_labels, document_positions, parse_entry
from pptk.data.lm import pack_tokens, tokenize_texts
from pptk.data.prepare import prepare_documents, prepare_files
from pptk.data.sampler import Shard, sample_positions
from pptk.errors import PptkError
from pptk.tasks.causal_lm import lm_batch

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v0"
TOKENIZER_DIR = FIXTURE / "model"
TEXT = (FIXTURE / "data.txt").read_text()
DOCS = [d for d in TEXT.split("\n\n") if d.strip()][:120]  # docstring-sized documents


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The same 120 documents as one-document .txt files, .jsonl, .jsonl.gz and .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("inputs")
    txt = []
    for i, doc in enumerate(DOCS[:40]):
        (d / f"doc{i:02d}.txt").write_text(doc)
        txt.append(d / f"doc{i:02d}.txt")
    lines = "\n".join(json.dumps({"text": doc, "id": i}) for i, doc in enumerate(DOCS[40:80]))
    (d / "part.jsonl").write_text(lines + "\n\n")
    (d / "part.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    pq.write_table(pa.table({"text": DOCS[80:], "n": list(range(40))}), d / "part.parquet", row_group_size=7)
    return {"txt": txt, "jsonl": d / "part.jsonl", "gz": d / "part.jsonl.gz", "parquet": d / "part.parquet"}


@pytest.fixture(scope="module")
def prepared(inputs, tokenizer, tmp_path_factory):
    files = [*inputs["txt"], inputs["jsonl"], inputs["parquet"]]
    return prepare_files(files, tokenizer=tokenizer, out=tmp_path_factory.mktemp("sets") / "set")


def test_every_input_kind_gives_the_tokens_of_in_memory_tokenization(prepared, tokenizer):
    m = prepared.manifest
    reference = tokenize_texts(DOCS, tokenizer)  # the in-memory path: ids + eos per document
    opened = open_prepared(prepared.path)
    assert isinstance(opened.tokens, np.memmap) and opened.tokens.dtype == np.uint16
    assert np.array_equal(np.asarray(opened.tokens), reference)
    ends = np.flatnonzero(reference == tokenizer.eos_token_id) + 1
    assert np.array_equal(np.asarray(opened.offsets), np.concatenate([[0], ends]))
    assert (m["num_documents"], m["num_tokens"], m["max_token_id"]) == (120, len(reference), int(reference.max()))
    assert m["dtype"] == "uint16" and m["format"] == 1 and m["tokenizer"]["eos_id"] == tokenizer.eos_token_id
    assert len(m["tokenizer"]["hash"]) == 64 and m["tokenizer"]["vocab_size"] == len(tokenizer)
    assert [e["size"] for e in m["source"]["inputs"]][:2] == [len(DOCS[0].encode()), len(DOCS[1].encode())]
    assert all("mtime_ns" in e for e in m["source"]["inputs"])


def test_gzip_and_lines_are_documents_and_two_workers_match(inputs, tokenizer, tmp_path, prepared):
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(d.replace("\n", " ") for d in DOCS[:30]) + "\n\n  \n")
    one = prepare_files([inputs["gz"], lines], tokenizer=tokenizer, out=tmp_path / "one", lines_are_documents=True)
    two = prepare_files(
        [inputs["gz"], lines], tokenizer=tokenizer, out=tmp_path / "two", lines_are_documents=True, workers=2
    )
    assert (tmp_path / "one" / "tokens.bin").read_bytes() == (tmp_path / "two" / "tokens.bin").read_bytes()
    assert one.manifest["num_documents"] == 40 + 30
    expected = tokenize_texts(DOCS[40:80] + [d.replace("\n", " ").strip() for d in DOCS[:30]], tokenizer)
    assert np.array_equal(np.asarray(open_prepared(two.path).tokens), expected)


def test_rerun_is_a_no_op_a_changed_input_rebuilds_and_nothing_partial_stays(inputs, tokenizer, tmp_path):
    src = tmp_path / "a.txt"
    src.write_text(DOCS[0])
    first = prepare_files([src], tokenizer=tokenizer, out=tmp_path / "set")
    stamp = (tmp_path / "set" / "tokens.bin").stat().st_mtime_ns
    again = prepare_files([src], tokenizer=tokenizer, out=tmp_path / "set")
    assert not first.reused and again.reused
    assert (tmp_path / "set" / "tokens.bin").stat().st_mtime_ns == stamp
    src.write_text(DOCS[0] + " and more")
    changed = prepare_files([src], tokenizer=tokenizer, out=tmp_path / "set")
    assert not changed.reused and changed.manifest["num_tokens"] > first.manifest["num_tokens"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "set"]
    (tmp_path / "other").mkdir()
    with pytest.raises(PptkError, match="exists and is not a prepared set"):
        prepare_files([src], tokenizer=tokenizer, out=tmp_path / "other")


def test_bad_inputs_get_one_error_naming_the_file(tmp_path, tokenizer):
    cases = {
        "empty.txt": (b"", "is empty"),
        "blank.txt": (b"  \n\n ", "holds no non-blank document"),
        "binary.txt": (b"abc\0\1\2", "is binary"),
        "latin1.txt": ("caf\u00e9".encode("latin-1"), "is not UTF-8 text"),
        "bad.jsonl": (b'{"text": "ok"}\n{oops\n', "line 2 is not JSON"),
        "field.jsonl": (b'{"body": "x"}\n', "has no field 'text' \\(it has: body\\); pass --text-field"),
        "data.csv": (b"a,b\n", "unknown input type"),
        "broken.parquet": (b"not parquet at all", "is not a readable Parquet file"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(PptkError, match=message) as err:
            prepare_files([path], tokenizer=tokenizer, out=tmp_path / "out")
        assert str(path) in str(err.value)
    with pytest.raises(PptkError, match="missing.txt' does not exist"):
        prepare_files([tmp_path / "missing.txt"], tokenizer=tokenizer, out=tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial*"))


def test_the_cli_prepares_and_reports(inputs, tmp_path):
    cmd = [str(Path(sys.executable).parent / "pptk"), "data", "prepare", str(inputs["jsonl"]), "--tokenizer"]
    out = subprocess.run(
        [*cmd, str(TOKENIZER_DIR), "--out", str(tmp_path / "s"), "--workers", "1"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "40 documents" in out.stdout and "--data" in out.stdout
    bad = subprocess.run([*cmd, str(tmp_path / "nope"), "--out", str(tmp_path / "t")], capture_output=True, text=True)
    assert bad.returncode == 2 and "pptk data: error:" in bad.stderr and "is not a directory" in bad.stderr


# --- reading: checks, split, blocks and blends ----------------------------------------------------------------------


def test_prepared_blocks_equal_in_memory_packed_blocks(prepared, tokenizer):
    train, held_out = split_by_document(open_prepared(prepared.path), eval_fraction=0.1, block_size=16)
    reference = tokenize_texts(DOCS, tokenizer)
    cut = int(np.flatnonzero(reference == tokenizer.eos_token_id)[107]) + 1  # 12 of 120 documents held out, whole
    assert (train.begin, train.end, held_out.begin, held_out.end) == (0, cut, cut, len(reference))
    packed = pack_tokens(reference[:cut], block_size=16)
    mixed = blend([train], None, seed=5)
    chosen = np.arange(37, 45)
    _, blocks = mixed.choose(chosen)
    (input_ids, _), labels = lm_batch(mixed.read(chosen))
    assert torch.equal(input_ids, packed[torch.from_numpy(blocks)]) and torch.equal(labels, input_ids)


def test_tokenizer_mismatch_and_ids_past_the_vocabulary_are_refused(prepared, tokenizer, tmp_path):
    sets = collect_sets([prepared.path], tokenizer=tokenizer, cache_dir=tmp_path)
    build_corpus(sets, tokenizer=tokenizer, vocab_size=300, block_size=16, eval_fraction=0.05, seed=0)
    with pytest.raises(PptkError, match="holds token id .* but the model's vocab_size is 100"):
        build_corpus(sets, tokenizer=tokenizer, vocab_size=100, block_size=16, eval_fraction=0.05, seed=0)
    other = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    other.add_tokens(["<new>"])
    with pytest.raises(PptkError, match="was made with tokenizer .* but this run uses"):
        build_corpus(sets, tokenizer=other, vocab_size=400, block_size=16, eval_fraction=0.05, seed=0)
    with pytest.raises(PptkError, match="weights apply to prepared directories"):
        collect_sets([f"{FIXTURE / 'data.txt'}:0.5"], tokenizer=tokenizer, cache_dir=tmp_path)
    assert parse_entry("runs/set:0.25").weight == 0.25 and parse_entry("runs/set").weight is None


def test_text_files_are_prepared_into_the_cache_once(tokenizer, tmp_path):
    sets = collect_sets([FIXTURE / "data.txt"], tokenizer=tokenizer, cache_dir=tmp_path / "cache")
    assert sets[0][0].path == tmp_path / "cache" and sets[0][1] is None
    assert (
        collect_sets([tmp_path / "cache"], tokenizer=tokenizer, cache_dir=tmp_path / "x")[0][0].path
        == tmp_path / "cache"
    )


def test_permutation_is_a_bijection_with_constant_memory():
    for n in (1, 2, 7, 100, 1000, 4097):
        out = permute(np.arange(n), n, key=12345)
        assert sorted(out.tolist()) == list(range(n))
    assert not np.array_equal(permute(np.arange(100), 100, key=1), permute(np.arange(100), 100, key=2))


def test_blend_follows_weights_and_resumes_exactly():
    tokens = np.arange(3000, dtype=np.uint16)
    parts = [Blocks(tokens, 0, 1000, 10), Blocks(tokens, 1000, 1500, 10), Blocks(tokens, 1500, 3000, 10)]
    mixed = blend(parts, [0.6, 0.3, 0.1], seed=3)
    n = 20_000
    which, blocks = mixed.choose(np.arange(n))
    for i, weight in enumerate((0.6, 0.3, 0.1)):
        share = np.mean(which == i)
        assert abs(share - weight) < 4 * np.sqrt(weight * (1 - weight) / n), (i, share)
        assert blocks[which == i].max() < len(parts[i])
    later_which, later_blocks = mixed.choose(np.arange(12_345, 12_400))  # a resume computes no earlier sample
    assert np.array_equal(later_which, which[12_345:12_400]) and np.array_equal(later_blocks, blocks[12_345:12_400])
    single = blend([parts[0]], None, seed=3)
    assert sorted(single.choose(np.arange(100))[1].tolist()) == list(range(100))  # one epoch: each block once
    assert sorted(single.choose(np.arange(100, 200))[1].tolist()) == list(range(100))
    assert not np.array_equal(single.choose(np.arange(100))[1], single.choose(np.arange(100, 200))[1])
    assert blend(parts, None, seed=0).weights == pytest.approx((100 / 300, 50 / 300, 150 / 300))


def test_a_step_reads_the_same_samples_on_every_layout():
    def step_samples(dp, mbs, accum, step):
        out = []
        for rank in range(dp):
            it = sample_positions(Shard(dp_rank=rank, dp_size=dp, micro_batch_size=mbs), start=step * accum)
            out += [i for _ in range(accum) for i in next(it).tolist()]
        return sorted(out)

    for step in (0, 3):
        assert step_samples(1, 8, 2, step) == step_samples(2, 2, 4, step) == step_samples(4, 4, 1, step)
        assert step_samples(1, 8, 2, step) == list(range(step * 16, step * 16 + 16))


def test_document_positions_and_labels():
    eos = 0
    ids = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 4], [0, 3, 3, 3, 0, 0, 2, 2]])
    positions = document_positions(ids, eos_id=eos)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 0, 0, 1]]
    labels = document_labels(ids, positions)
    assert labels.tolist() == [[-100, 6, 0, -100, 8, 9, 0, -100], [-100, -100, 3, 3, 0, -100, -100, 2]]
    (_, _, batch_positions), batch_labels = lm_batch(ids, eos_id=eos)
    assert torch.equal(batch_positions, positions) and torch.equal(batch_labels, labels)


def test_demo_documents_are_prepared_once(tokenizer, tmp_path):
    first = prepare_documents(DOCS[:5], tokenizer=tokenizer, out=tmp_path / "demo", name="demo")
    again = prepare_documents(DOCS[:5], tokenizer=tokenizer, out=tmp_path / "demo", name="demo")
    other = prepare_documents(DOCS[:6], tokenizer=tokenizer, out=tmp_path / "demo", name="demo")
    assert (first.reused, again.reused, other.reused) == (False, True, False)
    assert other.manifest["num_documents"] == 6 and os.listdir(tmp_path) == ["demo"]


def test_the_tokenizer_hash_ignores_truncation_and_padding_settings():
    """transformers sets them on the backend when called with truncation=True: the same tokenizer must still match."""
    from pptk.data.prepare import tokenizer_fingerprint

    fresh = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    used = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    used.pad_token = used.eos_token
    used(["a b c", "d"], truncation=True, max_length=2, padding="max_length")
    assert used.backend_tokenizer.truncation is not None  # the call really changed the backend
    assert tokenizer_fingerprint(used)["hash"] == tokenizer_fingerprint(fresh)["hash"]
