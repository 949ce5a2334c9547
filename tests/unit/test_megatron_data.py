# Megatron-LM's indexed datasets, against the real library (megatron-core, a pinned dev dependency): sets its builder
# writes are read by pptk block for block; sets pptk writes are read by its IndexedDataset; bad files and sets of
# another tokenizer are refused with one error; `pptk data inspect` shows either format.
import shutil
import struct
import warnings
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from pptk.cli import main
from pptk.cli.data import cmd_inspect
from pptk.data.blocks import blend, open_prepared, split_by_document
from pptk.data.corpus import build_corpus, collect_sets, document_positions
from pptk.data.inspection import inspect_set
from pptk.data.lm import pack_tokens
from pptk.data.megatron import read_index, write_index
from pptk.data.prepare import prepare_files
from pptk.errors import PptkError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v0"
TOKENIZER_DIR = FIXTURE / "model"
DOCS = [d for d in (FIXTURE / "data.txt").read_text().split("\n\n") if d.strip()][:120]


@pytest.fixture(scope="module")
def megatron():
    """megatron.core.datasets.indexed_dataset: imports on CPU without CUDA (it warns that Transformer Engine and
    Apex are absent, which the indexed dataset does not use)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def build(megatron, prefix: Path, documents: list[list[list[int]]], dtype=np.uint16) -> Path:
    """A set written by Megatron's own IndexedDatasetBuilder: each document a list of sequences."""
    builder = megatron.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for sequences in documents:
        for ids in sequences:
            builder.add_item(torch.tensor(ids, dtype=torch.int64))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return prefix


def sentences(doc: str, tokenizer, *, eod: bool = True) -> list[list[int]]:
    """A document as Megatron's preprocess_data.py --split-sentences --append-eod writes it: one sequence per line,
    the eod on the last."""
    lines = [tokenizer(line, add_special_tokens=False)["input_ids"] for line in doc.splitlines() if line.strip()]
    if eod:
        lines[-1] = [*lines[-1], tokenizer.eos_token_id]
    return lines


@pytest.fixture(scope="module")
def foreign(megatron, tokenizer, tmp_path_factory):
    """The 120 documents, several sequences each, written by megatron-core; and its IndexedDataset."""
    prefix = tmp_path_factory.mktemp("megatron") / "web_text_document"
    build(megatron, prefix, [sentences(doc, tokenizer) for doc in DOCS])
    return prefix, megatron.IndexedDataset(str(prefix))


def test_the_blocks_pptk_reads_equal_what_indexed_dataset_returns(foreign, tokenizer):
    prefix, dataset = foreign
    opened = open_prepared(prefix)
    assert (opened.layout, opened.manifest, opened.path) == ("megatron", None, prefix)
    assert isinstance(opened.tokens, np.memmap) and opened.tokens.dtype == np.uint16
    assert len(dataset) > opened.num_documents == len(dataset.document_indices) - 1 == 120  # sentences
    stream = np.concatenate([dataset[i] for i in range(len(dataset))])
    assert np.array_equal(np.asarray(opened.tokens), stream)
    first_sequence = dataset.document_indices
    for d in range(opened.num_documents):
        document = np.concatenate(dataset[int(first_sequence[d]) : int(first_sequence[d + 1])])
        assert np.array_equal(opened.tokens[opened.offsets[d] : opened.offsets[d + 1]], document)
    # the held-out split cuts at the first held-out document's first sequence, as Megatron's split by document
    train, held_out = split_by_document(opened, eval_fraction=0.1, block_size=16)
    cut = sum(len(dataset[i]) for i in range(int(first_sequence[108])))
    assert (train.end, held_out.begin, held_out.end) == (cut, cut, len(stream))
    mixed = blend([train], None, seed=5)
    samples = np.arange(40, 60)
    _, blocks = mixed.choose(samples)
    read = mixed.read(samples)
    assert torch.equal(read, pack_tokens(stream[:cut], block_size=16)[torch.from_numpy(blocks)])
    # document masking: positions restart exactly where the index says a document starts
    starts = {int(opened.offsets[d]) for d in range(opened.num_documents)}
    positions = document_positions(read, eos_id=tokenizer.eos_token_id)
    for row, block in zip(positions, blocks.tolist()):
        begin = block * 16
        expected = {0} | {s - begin for s in starts if begin < s < begin + 16}
        assert set(torch.nonzero(row == 0).flatten().tolist()) == expected


def test_a_prefix_blends_with_a_pptk_set_and_is_checked_against_tokenizer_and_model(
    foreign, megatron, tokenizer, tmp_path
):
    prefix, _ = foreign
    pptk_set = prepare_files([FIXTURE / "data.txt"], tokenizer=tokenizer, out=tmp_path / "pptk")
    sets = collect_sets([f"{prefix}:0.25", f"{pptk_set.path}:0.75"], tokenizer=tokenizer, cache_dir=tmp_path / "c")
    corpus = build_corpus(sets, tokenizer=tokenizer, vocab_size=300, block_size=16, eval_fraction=0.05, seed=0)
    assert "(web_text_document:0.25, pptk:0.75)" in corpus.describe()
    assert collect_sets([f"{prefix}.idx"], tokenizer=tokenizer, cache_dir=tmp_path)[0][0].path == prefix
    with pytest.raises(PptkError, match=r"holds token id 29\d \(in 1\d,\d{3} sampled of its .* vocab_size is 200"):
        build_corpus(sets, tokenizer=tokenizer, vocab_size=200, block_size=16, eval_fraction=0.05, seed=0)
    with pytest.raises(PptkError, match="not found: .*nothing:0.5; check the paths .*a Megatron set is given by"):
        collect_sets([f"{tmp_path / 'nothing'}:0.5"], tokenizer=tokenizer, cache_dir=tmp_path)

    def refused(documents, message, dtype=np.uint16, vocab_size=300):
        odd = build(megatron, tmp_path / f"odd{len(list(tmp_path.iterdir()))}", documents, dtype)
        with pytest.raises(PptkError, match=message) as err:
            build_corpus(
                collect_sets([odd], tokenizer=tokenizer, cache_dir=tmp_path),
                tokenizer=tokenizer,
                vocab_size=vocab_size,
                block_size=4,
                eval_fraction=0,
                seed=0,
            )
        assert str(odd) in str(err.value)

    ids = [[[5, 6, 7, 0]] * 20]
    refused(ids, r"stores token ids as uint8 \(at most 255\), but tokenizer .* has 300 tokens", dtype=np.uint8)
    refused([[[5, 6, 450, 0]] * 20], "holds token id 450 .* beyond the 300 tokens of tokenizer", np.int32, 1000)
    refused([[[5, 6, 7]]] * 20, r"20 of 20 sampled documents do not end with the eos id 0 .*document 0 ends with 7")


def corrupt(prefix: Path, tmp_path: Path, name: str, *, idx=None, bin_bytes=None) -> Path:
    """A copy of the set with its .idx or .bin bytes replaced."""
    copy = tmp_path / name
    shutil.copy(f"{prefix}.bin", f"{copy}.bin")
    shutil.copy(f"{prefix}.idx", f"{copy}.idx")
    if idx is not None:
        Path(f"{copy}.idx").write_bytes(idx(Path(f"{prefix}.idx").read_bytes()))
    if bin_bytes is not None:
        Path(f"{copy}.bin").write_bytes(bin_bytes(Path(f"{prefix}.bin").read_bytes()))
    return copy


def shift(at: int, by: int):
    """Add ``by`` to the int64 at byte ``at``."""
    return lambda b: b[:at] + struct.pack("<q", struct.unpack_from("<q", b, at)[0] + by) + b[at + 8 :]


def test_bad_megatron_files_get_one_error_naming_the_file(foreign, tmp_path):
    prefix, dataset = foreign
    sequences = len(dataset)
    pointer = 34 + 4 * sequences + 8 * 5  # sequence 5's byte offset
    cases = {
        "magic": (dict(idx=lambda b: b"NOTANIDX!" + b[9:]), "does not start with Megatron's magic"),
        "version": (
            dict(idx=lambda b: b[:9] + struct.pack("<Q", 2) + b[17:]),
            "has format version 2; pptk reads version 1",
        ),
        "float": (dict(idx=lambda b: b[:17] + bytes([6]) + b[18:]), "has dtype code 6; token ids are stored as"),
        "header": (dict(idx=lambda b: b[:20]), "is 20 bytes, shorter than its 34-byte header: truncated"),
        "arrays": (dict(idx=lambda b: b[:-100]), rf"is [\d,]+ bytes but its header says {sequences:,} sequences"),
        "modes": (dict(idx=lambda b: b + bytes(sequences)), "has a mode per sequence"),
        "gap": (dict(idx=shift(pointer, 2)), "sequence 5 starts at byte .*, not where sequence 4 ends"),
        "short_bin": (
            dict(bin_bytes=lambda b: b[:-2]),
            r"is [\d,]+ bytes, but its index describes [\d,]+ uint16 tokens",
        ),
    }
    for name, (change, message) in cases.items():
        bad = corrupt(prefix, tmp_path, name, **change)
        with pytest.raises(PptkError, match=message) as err:
            open_prepared(bad)
        assert str(bad) in str(err.value), name
    lonely = corrupt(prefix, tmp_path, "lonely")
    Path(f"{lonely}.bin").unlink()
    with pytest.raises(PptkError, match="has lonely.idx but no lonely.bin; copy it too"):
        open_prepared(lonely)
    Path(f"{lonely}.idx").rename(f"{lonely}.bin")
    with pytest.raises(PptkError, match="lonely.idx' does not exist; a Megatron set is PREFIX.bin with PREFIX.idx"):
        open_prepared(lonely)
    longer = corrupt(prefix, tmp_path, "longer", bin_bytes=lambda b: b + bytes(6))  # read as far as its index says
    assert np.array_equal(open_prepared(longer).tokens, open_prepared(prefix).tokens)


def test_pptk_prepare_format_megatron_is_read_by_indexed_dataset(megatron, tokenizer, tmp_path):
    files = [FIXTURE / "data.txt"]
    ours = prepare_files(files, tokenizer=tokenizer, out=tmp_path / "m", layout="megatron", lines_are_documents=True)
    plain = prepare_files(files, tokenizer=tokenizer, out=tmp_path / "p", lines_are_documents=True)
    assert sorted(p.name for p in ours.path.iterdir()) == ["manifest.json", "tokens.bin", "tokens.idx"]
    assert ours.manifest["layout"] == "megatron" and ours.manifest["max_token_id"] == plain.manifest["max_token_id"]
    dataset = megatron.IndexedDataset(str(ours.path / "tokens"))
    reference = open_prepared(plain.path)
    assert len(dataset) == reference.num_documents == ours.manifest["num_documents"] > 1000
    for d in range(reference.num_documents):
        assert np.array_equal(dataset[d], reference.tokens[reference.offsets[d] : reference.offsets[d + 1]])
    # opened by the directory or by the prefix, pptk's manifest is used (the tokenizer's record, not samples)
    for path in (ours.path, ours.path / "tokens"):
        opened = open_prepared(path)
        assert (opened.path, opened.layout, opened.manifest) == (ours.path, "megatron", ours.manifest)
    assert prepare_files(files, tokenizer=tokenizer, out=ours.path, layout="megatron", lines_are_documents=True).reused
    index = ours.path / "tokens.idx"
    data = bytearray(index.read_bytes())
    data[40] ^= 0xFF  # a sequence length: same size, still a valid header
    index.write_bytes(bytes(data))
    with pytest.raises(PptkError, match="m'.*the set is damaged: prepare it again"):
        open_prepared(ours.path)


def test_ids_past_uint16_are_written_as_int32_that_megatron_reads(megatron, tmp_path):
    tokens = np.array([70_000, 1, 2, 99_999, 0, 5], dtype=np.int32)
    (tmp_path / "big.bin").write_bytes(tokens.tobytes())
    write_index(tmp_path / "big.idx", np.array([0, 3, 6], dtype=np.int64), "int32")
    dataset = megatron.IndexedDataset(str(tmp_path / "big"))
    assert [d.tolist() for d in dataset] == [[70_000, 1, 2], [99_999, 0, 5]]
    index = read_index(tmp_path / "big.idx")
    assert (index.dtype, index.num_documents, index.num_tokens) == (np.dtype("int32"), 2, 6)


def test_inspect_shows_either_format_and_checks_a_tokenizer(foreign, tokenizer, tmp_path):
    prefix, _ = foreign
    text = inspect_set(prefix).text
    assert "megatron (web_text_document.bin + web_text_document.idx), no pptk manifest" in text
    assert "documents    120" in text and "largest id   29" in text and "(sampled: " in text
    assert inspect_set(prefix, tokenizer=tokenizer).text.endswith("fits the set")
    pptk_set = prepare_files([FIXTURE / "data.txt"], tokenizer=tokenizer, out=tmp_path / "set")
    shown = inspect_set(pptk_set.path)
    assert "pptk (tokens.bin + documents.idx + manifest.json)" in shown.text and "recorded at prepare" in shown.text
    assert "first document (62,101 tokens, the first 256 shown)" in shown.text and "give --tokenizer" in shown.text


def test_the_cli_prepares_megatron_format_and_inspects_it(tmp_path, capsys):
    out = tmp_path / "s"
    args = [str(FIXTURE / "data.txt"), "--tokenizer", str(TOKENIZER_DIR), "--out", str(out), "--workers", "1"]
    assert main(["data", "prepare", *args, "--format", "megatron"]) == 0
    assert f"Megatron-LM with --data-path {out / 'tokens'}" in capsys.readouterr().out
    assert cmd_inspect(Namespace(path=out / "tokens", tokenizer=TOKENIZER_DIR)) == 0
    shown = capsys.readouterr().out
    assert "megatron (tokens.bin + tokens.idx), prepared by pptk" in shown and "\n    abc\n\n    Abstract Base" in shown
    other = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    other.add_tokens(["<new>"])
    other.save_pretrained(tmp_path / "other")
    assert cmd_inspect(Namespace(path=out, tokenizer=tmp_path / "other")) == 1
    shown = capsys.readouterr().out
    assert "does not fit" in shown and "was made with tokenizer" in shown
