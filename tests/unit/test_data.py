# Data: the offline corpus, the demo tokenizer, packing, and the per-dp-rank micro-batch stream.
import json
import sys

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from pptk.data.demo import DEMO_MODULES, EOS, demo_corpus, demo_documents, train_demo_tokenizer
from pptk.data.lm import LMBlocks, check_token_ids, pack_tokens, split_train_eval, tokenize_files, tokenize_texts
from pptk.errors import PptkError
from pptk.tasks.causal_lm import lm_batch

VOCAB = 1024


@pytest.fixture(scope="module")
def corpus():
    return demo_corpus()


@pytest.fixture(scope="module")
def text(corpus):
    return corpus[:200_000]


@pytest.fixture(scope="module")
def tokenizer_dir(text, tmp_path_factory):
    return train_demo_tokenizer(text=text, vocab_size=VOCAB, out_dir=tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def numbered_blocks(n, block_size=3):
    # Row i holds i in every position, so a batch's rows name the blocks it came from.
    return LMBlocks(torch.arange(n).repeat_interleave(block_size).reshape(n, block_size))


# --- demo corpus ----------------------------------------------------------------------------------------------


def test_demo_corpus_is_deterministic_and_megabytes(corpus):
    assert demo_corpus() == corpus
    assert 1_000_000 < len(corpus) < 10_000_000


def test_demo_corpus_is_the_documents_joined(corpus):
    documents = demo_documents()
    assert "\n\n".join(documents) == corpus
    assert len(documents) > 3000
    assert all(doc.strip() == doc and doc for doc in documents)
    assert any(doc.startswith("json.dumps\n\nSerialize ``obj`` to a JSON formatted ``str``.") for doc in documents)


def test_demo_corpus_holds_stdlib_docstrings_in_module_order(corpus):
    assert "builtins.abs\n\nReturn the absolute value of the argument." in corpus
    # Loaded lazily by concurrent.futures: present whether or not anything touched it first.
    assert "concurrent.futures.ProcessPoolExecutor\n\n" in corpus
    assert corpus.index("\n\nargparse\n\n") < corpus.index("\n\njson\n\n") < corpus.index("\n\nzlib\n\n")
    assert corpus.startswith("abc\n\nAbstract Base Classes (ABCs) according to PEP 3119.")


def test_demo_corpus_ignores_what_other_libraries_patch_in(corpus):
    import transformers.utils.logging  # noqa: F401  adds logging.Logger.warning_once

    assert "logging.Logger.warning_once" not in corpus
    assert demo_corpus() == corpus


def test_demo_corpus_never_imports_side_effect_modules(corpus):
    forbidden = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}
    assert not forbidden & {name.partition(".")[0] for name in DEMO_MODULES}
    assert not forbidden & set(sys.modules)
    assert list(DEMO_MODULES) == sorted(DEMO_MODULES)


# --- demo tokenizer -------------------------------------------------------------------------------------------


def test_tokenizer_loads_with_auto_tokenizer(tokenizer):
    assert len(tokenizer) == VOCAB
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == tokenizer.unk_token == EOS
    assert tokenizer.eos_token_id == 0


@pytest.mark.parametrize(
    "sample",
    [
        "def f(x):\n    return x ** 2  # squared\n",
        "Unicode: héllo wörld, ☃, 日本語, emoji 🚀.",
        "   leading spaces and trailing tabs\t\t\n\n",
    ],
)
def test_tokenizer_round_trip(tokenizer, sample):
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == sample
    assert max(ids) < VOCAB


def test_tokenizer_compresses_its_training_text(tokenizer, text):
    ids = tokenizer(text[:20_000], add_special_tokens=False)["input_ids"]
    assert len(ids) < 20_000 / 2.5


def test_tokenizer_training_is_deterministic(text, tokenizer_dir, tmp_path):
    again = train_demo_tokenizer(text=text, vocab_size=VOCAB, out_dir=tmp_path / "again")
    first = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    second = json.loads((again / "tokenizer.json").read_text())
    assert first["model"]["vocab"] == second["model"]["vocab"]
    assert first["model"]["merges"] == second["model"]["merges"]


def test_tokenizer_is_reused_when_cached(text, tokenizer_dir):
    before = (tokenizer_dir / "tokenizer.json").stat().st_mtime_ns
    assert train_demo_tokenizer(text=text, vocab_size=VOCAB, out_dir=tokenizer_dir) == tokenizer_dir
    assert (tokenizer_dir / "tokenizer.json").stat().st_mtime_ns == before


def test_tokenizer_cache_refuses_a_different_tokenizer(text, tokenizer_dir):
    with pytest.raises(
        PptkError, match="already holds a tokenizer trained on other text or another vocab_size \\(1024, wanted 512\\)"
    ):
        train_demo_tokenizer(text=text, vocab_size=512, out_dir=tokenizer_dir)
    with pytest.raises(PptkError, match="already holds a tokenizer trained on other text"):
        train_demo_tokenizer(text=text[:-1], vocab_size=VOCAB, out_dir=tokenizer_dir)


def test_tokenizer_bad_arguments(tmp_path):
    with pytest.raises(PptkError, match="vocab_size 256 is too small: a byte-level BPE needs the 256 bytes"):
        train_demo_tokenizer(text="abc", vocab_size=256, out_dir=tmp_path / "t")
    with pytest.raises(PptkError, match="cannot train a tokenizer on empty text"):
        train_demo_tokenizer(text="", out_dir=tmp_path / "t")


# --- tokenizing and packing -----------------------------------------------------------------------------------


def test_tokenize_files_puts_eos_after_each_document(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.txt").write_text("second one\n")
    ids = tokenize_files([tmp_path / "a.txt", tmp_path / "b.txt"], tokenizer)
    a = tokenizer("first document", add_special_tokens=False)["input_ids"]
    b = tokenizer("second one\n", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == [*a, 0, *b, 0]
    assert ids.dtype == np.int32
    assert tokenize_texts(["first document", "second one\n"], tokenizer).tolist() == ids.tolist()
    assert tokenize_texts([], tokenizer).tolist() == []


def test_tokenize_files_errors(tokenizer, tmp_path):
    with pytest.raises(PptkError, match=f"text file {str(tmp_path / 'missing.txt')!r} does not exist"):
        tokenize_files([tmp_path / "missing.txt"], tokenizer)
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(PptkError, match=f"text file {str(tmp_path / 'empty.txt')!r} is empty"):
        tokenize_files([tmp_path / "empty.txt"], tokenizer)
    with pytest.raises(PptkError, match="no text files given"):
        tokenize_files([], tokenizer)
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(PptkError, match=f"text file {str(tmp_path / 'latin1.txt')!r} is not UTF-8 text \\(byte 3"):
        tokenize_files([tmp_path / "latin1.txt"], tokenizer)


def test_tokenize_needs_an_eos_token(tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    no_eos = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    with pytest.raises(PptkError, match="has no eos token, so documents cannot be separated"):
        tokenize_texts(["text"], no_eos)


@pytest.mark.parametrize("ids", [list(range(11)), np.arange(11, dtype=np.int32)])
def test_pack_tokens_drops_the_remainder(ids):
    blocks = pack_tokens(ids, block_size=4)
    assert blocks.dtype == torch.long
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_pack_tokens_errors():
    with pytest.raises(PptkError) as err:
        pack_tokens(list(range(5)), block_size=8)
    assert str(err.value) == (
        "5 tokens are fewer than one block of block_size 8; give more text or use a smaller block_size"
    )
    with pytest.raises(PptkError, match="block_size must be a positive integer, got 0"):
        pack_tokens([1, 2], block_size=0)


def test_lm_blocks():
    blocks = LMBlocks.from_tokens(np.arange(10), block_size=3)
    assert (len(blocks), blocks.block_size) == (3, 3)
    assert blocks[1].tolist() == [3, 4, 5]
    with pytest.raises(PptkError, match="LMBlocks needs a 2-D int64 tensor"):
        LMBlocks(torch.zeros(4, 2, dtype=torch.int32))


def test_check_token_ids():
    check_token_ids(np.array([0, 5, 9]), vocab_size=10)
    check_token_ids([], vocab_size=10)
    with pytest.raises(PptkError) as err:
        check_token_ids(torch.tensor([[3, 50257], [7, 1]]), vocab_size=4096)
    assert str(err.value) == (
        "token ids span [1, 50257] but the model's vocab_size is 4096: the tokenizer and the "
        "model disagree; use the tokenizer the model was trained with, or resize the model's "
        "embeddings to len(tokenizer)"
    )
    with pytest.raises(PptkError, match=r"token ids span \[-1, 3\]"):
        check_token_ids([-1, 3], vocab_size=10)


# --- train/eval split -----------------------------------------------------------------------------------------


def test_split_train_eval():
    blocks = numbered_blocks(20)
    train, held_out = split_train_eval(blocks, eval_fraction=0.25, seed=3)
    train_ids, eval_ids = train[:, 0].tolist(), held_out[:, 0].tolist()
    assert (len(train_ids), len(eval_ids)) == (15, 5)
    assert sorted(train_ids + eval_ids) == list(range(20))
    assert train_ids == sorted(train_ids) and eval_ids == sorted(eval_ids)
    again = split_train_eval(blocks, eval_fraction=0.25, seed=3)[1][:, 0].tolist()
    other = split_train_eval(blocks, eval_fraction=0.25, seed=4)[1][:, 0].tolist()
    assert again == eval_ids and other != eval_ids


def test_split_train_eval_errors():
    with pytest.raises(PptkError, match="eval_fraction must be between 0 and 1 \\(exclusive\\), got 1.0"):
        split_train_eval(numbered_blocks(10), eval_fraction=1.0, seed=0)
    with pytest.raises(PptkError, match="eval_fraction 0.01 of 10 blocks leaves 0 for eval and 10 for training"):
        split_train_eval(numbered_blocks(10), eval_fraction=0.01, seed=0)


# --- causal-LM micro-batches --------------------------------------------------------------------------------


def test_lm_batch_shapes_and_types():
    blocks = LMBlocks(torch.randint(0, 100, (12, 5)))
    (input_ids, attention_mask), labels = lm_batch(blocks[np.array([3, 0, 7, 11])])
    for tensor in (input_ids, attention_mask, labels):
        assert tensor.shape == (4, 5) and tensor.dtype == torch.int64
    assert attention_mask.eq(1).all()
    assert torch.equal(labels, input_ids) and labels.data_ptr() != input_ids.data_ptr()
    assert torch.equal(input_ids[0], blocks.tokens[3]) and torch.equal(input_ids[3], blocks.tokens[11])


@pytest.mark.parametrize("name", ["train.csv", "train.jsonl", "train.conll", "lines.txt"])
def test_a_binary_data_file_is_one_error_naming_it(tmp_path, name):
    from pptk.data.readers import read_conll, read_lines, read_text_classification

    path = tmp_path / name
    path.write_bytes(b"text,label\n" + bytes(range(128, 256)) * 4)
    reader = {".csv": read_text_classification, ".jsonl": read_text_classification, ".conll": read_conll}
    with pytest.raises(PptkError, match=rf"{path} is not UTF-8 text .*binary file"):
        reader.get(path.suffix, lambda p: read_lines([p]))(path)
