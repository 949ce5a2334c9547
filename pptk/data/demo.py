# The embedded demo: an offline corpus (the standard library's docstrings) and a byte-level BPE tokenizer trained on it.
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
from pathlib import Path
from typing import Any

from pptk.errors import PptkError

EOS = "<|endoftext|>"
# Fixed and sorted so the corpus is the same on every run of one Python build. Modules that open windows, print,
# or do work on import (antigravity, this, idlelib, tkinter, turtle*) are deliberately absent.
DEMO_MODULES = tuple(
    sorted(
        [
            "abc",
            "argparse",
            "array",
            "ast",
            "asyncio",
            "asyncio.base_events",
            "asyncio.events",
            "asyncio.futures",
            "asyncio.locks",
            "asyncio.queues",
            "asyncio.streams",
            "asyncio.tasks",
            "base64",
            "bdb",
            "binascii",
            "bisect",
            "builtins",
            "bz2",
            "calendar",
            "cmath",
            "cmd",
            "code",
            "codecs",
            "collections",
            "collections.abc",
            "colorsys",
            "concurrent.futures",
            "configparser",
            "contextlib",
            "contextvars",
            "copy",
            "csv",
            "ctypes",
            "dataclasses",
            "datetime",
            "decimal",
            "difflib",
            "dis",
            "doctest",
            "email.charset",
            "email.header",
            "email.headerregistry",
            "email.message",
            "email.parser",
            "email.policy",
            "email.utils",
            "enum",
            "errno",
            "filecmp",
            "fileinput",
            "fnmatch",
            "fractions",
            "ftplib",
            "functools",
            "gc",
            "getopt",
            "gettext",
            "glob",
            "graphlib",
            "gzip",
            "hashlib",
            "heapq",
            "hmac",
            "html",
            "html.parser",
            "http.client",
            "http.cookiejar",
            "http.cookies",
            "http.server",
            "imaplib",
            "importlib",
            "importlib.abc",
            "importlib.metadata",
            "importlib.resources",
            "importlib.util",
            "inspect",
            "io",
            "ipaddress",
            "itertools",
            "json",
            "json.decoder",
            "json.encoder",
            "keyword",
            "linecache",
            "locale",
            "logging",
            "logging.config",
            "logging.handlers",
            "lzma",
            "mailbox",
            "marshal",
            "math",
            "mimetypes",
            "mmap",
            "modulefinder",
            "multiprocessing",
            "multiprocessing.managers",
            "multiprocessing.pool",
            "multiprocessing.shared_memory",
            "numbers",
            "operator",
            "optparse",
            "os",
            "os.path",
            "pathlib",
            "pdb",
            "pickle",
            "pickletools",
            "pkgutil",
            "platform",
            "plistlib",
            "poplib",
            "pprint",
            "profile",
            "pstats",
            "queue",
            "quopri",
            "random",
            "re",
            "reprlib",
            "runpy",
            "sched",
            "secrets",
            "select",
            "selectors",
            "shelve",
            "shlex",
            "shutil",
            "signal",
            "smtplib",
            "socket",
            "socketserver",
            "sqlite3",
            "ssl",
            "stat",
            "statistics",
            "string",
            "struct",
            "subprocess",
            "symtable",
            "sys",
            "sysconfig",
            "tabnanny",
            "tarfile",
            "tempfile",
            "textwrap",
            "threading",
            "time",
            "timeit",
            "token",
            "tokenize",
            "tomllib",
            "trace",
            "traceback",
            "tracemalloc",
            "types",
            "typing",
            "unicodedata",
            "unittest",
            "unittest.case",
            "unittest.mock",
            "urllib.parse",
            "urllib.request",
            "urllib.robotparser",
            "uuid",
            "warnings",
            "wave",
            "weakref",
            "wsgiref.handlers",
            "wsgiref.validate",
            "xml.dom.minidom",
            "xml.dom.pulldom",
            "xml.etree.ElementTree",
            "xml.sax",
            "xml.sax.saxutils",
            "xmlrpc.client",
            "xmlrpc.server",
            "zipapp",
            "zipfile",
            "zipimport",
            "zlib",
            "zoneinfo",
        ]
    )
)
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
                    for member, raw in sorted(vars(obj).items()):
                        value = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
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
        raise PptkError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE needs the 256 bytes plus {EOS}; "
            "use at least 257 (4096 is a good demo size)"
        )
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
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS
    )
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
            raise PptkError(
                f"could not move the trained tokenizer into {out_dir}: it is a non-empty directory "
                "without a tokenizer; pass another out_dir or empty it"
            ) from None
    return out_dir


def _cached_tokenizer(out_dir: Path, *, meta: dict) -> bool:
    """True if out_dir holds the tokenizer for meta, False if there is none; raises if it holds another."""
    meta_path = out_dir / _TOKENIZER_META
    if meta_path.is_file():
        found = json.loads(meta_path.read_text())
        if found == meta:
            return True
        raise PptkError(
            f"{out_dir} already holds a tokenizer trained on other text or another vocab_size "
            f"({found.get('vocab_size')}, wanted {meta['vocab_size']}); pass another out_dir or "
            "delete that one"
        )
    if (out_dir / "tokenizer.json").is_file():
        raise PptkError(
            f"{out_dir} holds a tokenizer pptk did not train (no {_TOKENIZER_META}); pass another "
            "out_dir or delete that one"
        )
    return False
