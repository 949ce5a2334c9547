# Causal-LM pretraining data: an offline demo corpus and tokenizer, token packing, and per-dp-rank micro-batches.
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pptk.errors import PptkError

EOS = "<|endoftext|>"
# Fixed and sorted so the corpus is the same on every run of one Python build. Modules that open windows, print,
# or do work on import (antigravity, this, idlelib, tkinter, turtle*) are deliberately absent.
DEMO_MODULES = tuple(sorted("""
    abc argparse array ast asyncio asyncio.base_events asyncio.events asyncio.futures asyncio.locks asyncio.queues
    asyncio.streams asyncio.tasks base64 bdb binascii bisect builtins bz2 calendar cmath cmd code codecs collections
    collections.abc colorsys concurrent.futures configparser contextlib contextvars copy csv ctypes dataclasses
    datetime decimal difflib dis doctest email.charset email.header email.headerregistry email.message email.parser
    email.policy email.utils enum errno filecmp fileinput fnmatch fractions ftplib functools gc getopt gettext glob
    graphlib gzip hashlib heapq hmac html html.parser http.client http.cookiejar http.cookies http.server imaplib
    importlib importlib.abc importlib.metadata importlib.resources importlib.util inspect io ipaddress itertools json
    json.decoder json.encoder keyword linecache locale logging logging.config logging.handlers lzma mailbox marshal
    math mimetypes mmap modulefinder multiprocessing multiprocessing.managers multiprocessing.pool
    multiprocessing.shared_memory numbers operator optparse os os.path pathlib pdb pickle pickletools pkgutil
    platform plistlib poplib pprint profile pstats queue quopri random re reprlib runpy sched secrets select
    selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string struct
    subprocess symtable sys sysconfig tabnanny tarfile tempfile textwrap threading time timeit token tokenize tomllib
    trace traceback tracemalloc types typing unicodedata unittest unittest.case unittest.mock urllib.parse
    urllib.request urllib.robotparser uuid warnings wave weakref wsgiref.handlers wsgiref.validate xml.dom.minidom
    xml.dom.pulldom xml.etree.ElementTree xml.sax xml.sax.saxutils xmlrpc.client xmlrpc.server zipapp zipfile
    zipimport zlib zoneinfo
""".split()))
_TOKENIZER_META = "pptk_tokenizer.json"


def demo_corpus() -> str:
    """About 1.8 MB of English technical prose that every Python install has: `demo_documents()` joined by blank
    lines (which also occur inside documents; tokenize `demo_documents()` to put eos between documents)."""
    return "\n\n".join(demo_documents())


def demo_documents() -> list[str]:
    """The standard library's docstrings (each module, its public classes, functions and methods; a document is
    "qualified.name", a blank line, the docstring), then pydoc's language-reference topics, one document each.

    Deterministic for one Python build; under `python -OO` docstrings are stripped and there is about half.
    """
    docs: list[str] = []
    seen: set[int] = set()

    def add(title: str, obj: Any) -> None:
        # An object re-exported by several modules (os.stat, posix.stat) is written once, under the first.
        if id(obj) in seen or not _from_stdlib(obj):
            return
        seen.add(id(obj))
        doc = (inspect.getdoc(obj) or "").strip()
        if doc:
            docs.append(f"{title}\n\n{doc}")

    # Importing or reading some of these warns (typing.io is deprecated); under -W error that would drop a module.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in DEMO_MODULES:
            module = _quiet_import(name)
            if module is None:
                continue
            add(name, module)
            # __all__ too: names a module loads lazily (concurrent.futures.ProcessPoolExecutor) are in vars()
            # only after some other code touched them.
            for attr in sorted(set(vars(module)) | set(getattr(module, "__all__", ()))):
                obj = getattr(module, attr, None)
                if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                add(f"{name}.{attr}", obj)
                if inspect.isclass(obj):
                    for member, value in sorted(vars(obj).items()):
                        value = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
                        if not member.startswith("_") and (inspect.isroutine(value) or isinstance(value, property)):
                            add(f"{name}.{attr}.{member}", value)
        topics = _quiet_import("pydoc_data.topics")
    if topics is not None:
        docs += [topics.topics[key].strip() for key in sorted(topics.topics)]
    return docs


def _from_stdlib(obj: Any) -> bool:
    # Libraries patch the standard library (transformers adds logging.Logger.warning_once); their additions
    # would make the corpus depend on what was imported first.
    module = getattr(obj, "__module__", None)
    return not isinstance(module, str) or module.partition(".")[0] in sys.stdlib_module_names


def _quiet_import(name: str) -> Any:
    """The module, or None if it is missing on this build or writes anything while importing."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            module = importlib.import_module(name)
    except Exception:  # a module this build lacks (e.g. no _sqlite3) just leaves the corpus
        return None
    return None if out.getvalue() else module


def train_demo_tokenizer(*, text: str, vocab_size: int = 4096, out_dir: Path) -> Path:
    """Train a byte-level BPE on `text` and save it as a Hugging Face tokenizer directory; returns out_dir.

    `<|endoftext|>` (id 0) is the eos, bos, unk and pad token. Deterministic: the same text and vocab_size give
    the same tokenizer.json. Cached: a directory already holding the tokenizer for this text and vocab_size is
    reused; one holding a different tokenizer is an error rather than being overwritten under a trained model.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise PptkError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs the 256 bytes plus {EOS}; "
                        "use at least 257 (4096 is a good demo size)")
    if not text:
        raise PptkError("cannot train a tokenizer on empty text; pass the corpus, e.g. demo_corpus()")
    out_dir = Path(out_dir)
    meta = {"text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "vocab_size": vocab_size}
    if _cached_tokenizer(out_dir, meta=meta):
        return out_dir

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        # Every byte in the vocabulary, so any text encodes without unknown tokens.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                      pad_token=EOS)
    # Written beside out_dir and renamed into place, so ranks racing on one out_dir never see half a tokenizer.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the tokenizer is shared like any other run output
    wrapped.save_pretrained(staging)
    (staging / _TOKENIZER_META).write_text(json.dumps(meta, indent=2) + "\n")
    try:
        staging.rename(out_dir)  # replaces out_dir only if it is an empty directory
    except OSError:
        shutil.rmtree(staging)
        if not _cached_tokenizer(out_dir, meta=meta):
            raise PptkError(f"could not move the trained tokenizer into {out_dir}: it is a non-empty directory "
                            "without a tokenizer; pass another out_dir or empty it") from None
    return out_dir


def _cached_tokenizer(out_dir: Path, *, meta: dict) -> bool:
    """True if out_dir holds the tokenizer for meta, False if there is none; raises if it holds another."""
    meta_path = out_dir / _TOKENIZER_META
    if meta_path.is_file():
        found = json.loads(meta_path.read_text())
        if found == meta:
            return True
        raise PptkError(f"{out_dir} already holds a tokenizer trained on other text or another vocab_size "
                        f"({found.get('vocab_size')}, wanted {meta['vocab_size']}); pass another out_dir or "
                        "delete that one")
    if (out_dir / "tokenizer.json").is_file():
        raise PptkError(f"{out_dir} holds a tokenizer pptk did not train (no {_TOKENIZER_META}); pass another "
                        "out_dir or delete that one")
    return False


def tokenize_texts(texts: Sequence[str], tokenizer: Any) -> np.ndarray:
    """Token ids of each text followed by the eos token, concatenated (int32)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise PptkError(f"tokenizer {type(tokenizer).__name__} has no eos token, so documents cannot be separated; "
                        f"set one (tokenizer.eos_token = ...) or use train_demo_tokenizer, whose eos is {EOS}")
    if not texts:
        return np.zeros(0, dtype=np.int32)
    # One batched call (fast tokenizers encode it in parallel); verbose=False because whole documents are longer
    # than model_max_length by design, and packing cuts them into blocks.
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return np.fromiter((i for ids in encoded for i in [*ids, eos]), dtype=np.int32)


def tokenize_files(paths: Sequence[str | Path], tokenizer: Any) -> np.ndarray:
    """Token ids of UTF-8 text files, one document per file, each followed by eos (int32)."""
    if not paths:
        raise PptkError("no text files given; pass at least one path")
    texts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise PptkError(f"text file {str(path)!r} does not exist; check the path")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise PptkError(f"text file {str(path)!r} is empty; remove it from the list or fill it")
        texts.append(text)
    return tokenize_texts(texts, tokenizer)


def pack_tokens(token_ids: list[int] | np.ndarray, *, block_size: int) -> torch.Tensor:
    """[N, block_size] int64 blocks of consecutive tokens; the last len % block_size tokens are dropped."""
    if block_size < 1:
        raise PptkError(f"block_size must be a positive integer, got {block_size}")
    ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long).flatten()
    n_blocks = ids.numel() // block_size
    if n_blocks == 0:
        raise PptkError(f"{ids.numel()} tokens are fewer than one block of block_size {block_size}; "
                        "give more text or use a smaller block_size")
    return ids[: n_blocks * block_size].reshape(n_blocks, block_size).clone()


def check_token_ids(ids: Any, *, vocab_size: int) -> None:
    """Raise if any id is outside [0, vocab_size): an embedding lookup would fail (or read garbage on GPU)."""
    ids = torch.as_tensor(np.asarray(ids))
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if high >= vocab_size or low < 0:
        raise PptkError(f"token ids span [{low}, {high}] but the model's vocab_size is {vocab_size}: the tokenizer "
                        "and the model disagree; use the tokenizer the model was trained with, or resize the model's "
                        "embeddings to len(tokenizer)")


@dataclass(frozen=True, eq=False)
class LMBlocks:
    """Packed token blocks, [N, block_size] int64; row i is training example i."""

    tokens: torch.Tensor

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.tokens.dtype != torch.long:
            raise PptkError(f"LMBlocks needs a 2-D int64 tensor [N, block_size], got {self.tokens.dtype} "
                            f"{tuple(self.tokens.shape)}; build it with LMBlocks.from_tokens")

    @classmethod
    def from_tokens(cls, token_ids: list[int] | np.ndarray, *, block_size: int) -> LMBlocks:
        return cls(pack_tokens(token_ids, block_size=block_size))

    @property
    def block_size(self) -> int:
        return self.tokens.shape[1]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.tokens[index]


def split_train_eval(blocks: LMBlocks, *, eval_fraction: float, seed: int) -> tuple[LMBlocks, LMBlocks]:
    """A seeded random split of whole blocks into (train, eval), each kept in corpus order."""
    if not 0 < eval_fraction < 1:
        raise PptkError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    n_eval = round(len(blocks) * eval_fraction)
    if not 0 < n_eval < len(blocks):
        raise PptkError(f"eval_fraction {eval_fraction} of {len(blocks)} blocks leaves {n_eval} for eval and "
                        f"{len(blocks) - n_eval} for training; both need at least one: give more text, a smaller "
                        "block_size, or another eval_fraction")
    order = np.random.default_rng([seed]).permutation(len(blocks))
    eval_idx, train_idx = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    return LMBlocks(blocks.tokens[torch.from_numpy(train_idx)]), LMBlocks(blocks.tokens[torch.from_numpy(eval_idx)])


def micro_batches_per_epoch(num_blocks: int, *, micro_batch_size: int, dp_size: int) -> int:
    """Micro-batches each dp rank gets per epoch; the num_blocks % (micro_batch_size * dp_size) rest is skipped."""
    return num_blocks // (micro_batch_size * dp_size)


def batch_iterator(
    blocks: LMBlocks,
    *,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    epoch: int = 0,
    start_step: int = 0,
) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Endless `((input_ids, attention_mask), labels)` micro-batches for one dp rank, as PipelineEngine.train_batch
    consumes them. All int64 [micro_batch_size, block_size]; the mask is all ones (packed blocks have no padding)
    and labels are input_ids (the model shifts them).

    Each epoch is a permutation seeded by (seed, epoch); micro-batch i of that epoch on rank r is the permutation's
    slice number i * dp_size + r, so the dp ranks see disjoint blocks. start_step skips that many of this rank's
    micro-batches (counted from the start of `epoch`) without computing them, for exact resume.
    """
    for name, value in (("micro_batch_size", micro_batch_size), ("dp_size", dp_size)):
        if value < 1:
            raise PptkError(f"{name} must be a positive integer, got {value}")
    if not 0 <= dp_rank < dp_size:
        raise PptkError(f"dp_rank({dp_rank}) must be in [0, dp_size({dp_size}))")
    for name, value in (("seed", seed), ("epoch", epoch), ("start_step", start_step)):
        if value < 0:
            raise PptkError(f"{name} must be >= 0, got {value}")
    per_epoch = micro_batches_per_epoch(len(blocks), micro_batch_size=micro_batch_size, dp_size=dp_size)
    if per_epoch == 0:
        raise PptkError(f"{len(blocks)} blocks cannot give each of dp_size({dp_size}) ranks one micro-batch of "
                        f"{micro_batch_size}: need at least {micro_batch_size * dp_size} blocks; give more text or "
                        "use a smaller block_size or micro_batch_size")
    # Validation above runs at call time; the generator below only starts on the first next().
    return _micro_batches(blocks, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed,
                          epoch=epoch + start_step // per_epoch, step=start_step % per_epoch, per_epoch=per_epoch)


def _micro_batches(blocks: LMBlocks, *, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int, epoch: int,
                   step: int, per_epoch: int) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
    while True:
        order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(len(blocks)))
        for i in range(step, per_epoch):
            start = (i * dp_size + dp_rank) * micro_batch_size
            input_ids = blocks.tokens[order[start : start + micro_batch_size]]
            yield (input_ids, torch.ones_like(input_ids)), input_ids.clone()
        epoch, step = epoch + 1, 0
