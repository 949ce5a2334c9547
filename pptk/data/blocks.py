# Prepared sets read through memory maps: the eval split by document, fixed-length blocks and weighted blends.
"""Nothing here copies a token file into memory: ``open_prepared`` maps it (``np.memmap``), a pptk set or a
Megatron one (``PREFIX.bin`` + ``PREFIX.idx``), and a micro-batch reads only its own blocks. Which block a training
sample is depends only on its global sample index ``g`` (the position in the run's stream of samples: step * global
batch + its place in the step), so a run resumed on any layout with the same global batch reads exactly the blocks
the uninterrupted run would have:

- blend: set ``i`` is chosen for ``g`` with probability ``weight_i`` (a hash of ``(seed, g)``, Megatron-style
  weighted blending without its precomputed index arrays);
- within a set of ``n`` blocks, ``g`` names block ``permute(g mod n, key=(seed, set, g div n))``: a seeded
  pseudo-random permutation per pass (a Feistel network, constant memory), so a single set is read block by
  block in a new order every epoch, each block once per epoch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pptk.data.integrity import find_damage
from pptk.data.megatron import DocumentOffsets, idx_path, megatron_prefix, open_tokens, read_index
from pptk.data.prepare import FORMAT, MANIFEST_FILE, read_manifest
from pptk.data.vocabulary import check_foreign
from pptk.errors import PptkError

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True, eq=False)
class PreparedSet:
    """A token set of either layout: documents back to back in ``tokens``, document d is
    ``tokens[offsets[d]:offsets[d + 1]]``."""

    path: Path  # the prepared directory, or a Megatron set's path prefix
    manifest: dict | None  # pptk's manifest; None for a Megatron set made elsewhere (no tokenizer record)
    tokens: np.ndarray  # memmap, an integer dtype
    offsets: np.ndarray | DocumentOffsets  # memmap int64 (pptk), or computed from a Megatron index on demand
    layout: str = "pptk"  # or "megatron"

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def is_prepared(path: Path) -> bool:
    """A prepared directory, or a Megatron set (PREFIX, PREFIX.bin or PREFIX.idx)."""
    return (path.is_dir() and (path / MANIFEST_FILE).is_file()) or megatron_prefix(path) is not None


def open_prepared(path: str | Path) -> PreparedSet:
    """Map a prepared set read-only after a quick check of its files (pptk.data.integrity, pptk.data.megatron).

    A Megatron prefix inside a directory that pptk prepared with ``--format megatron`` opens that directory, so its
    manifest (tokenizer, largest token id, checksums) is used either way.
    """
    path = Path(path)
    prefix = megatron_prefix(path)
    if prefix is not None:
        home = prefix.parent
        manifest = read_manifest(home) if (home / MANIFEST_FILE).is_file() else None
        if manifest is None or manifest.get("index_file") != idx_path(prefix).name:
            index = read_index(idx_path(prefix))
            return PreparedSet(prefix, None, open_tokens(prefix, index), DocumentOffsets(index), "megatron")
        path = home
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as err:
        raise PptkError(
            f"{str(path)!r} is not a prepared set ({MANIFEST_FILE} unreadable: {err}); make one with "
            "`pptk data prepare`, or give a Megatron set's PREFIX (PREFIX.bin and PREFIX.idx)"
        ) from None
    if manifest.get("format") != FORMAT:
        raise PptkError(
            f"prepared set {str(path)!r} has format {manifest.get('format')}, this pptk reads {FORMAT}; prepare it "
            "again"
        )
    # Sizes, offsets and a sampled checksum: cheap at every start; prepare's up-to-date check reads every byte.
    damage = find_damage(path, manifest, full=False)
    if damage is not None:
        raise PptkError(
            f"prepared set {str(path)!r}: {damage}; the set is damaged: prepare it again (`pptk data prepare` "
            "with the same inputs and --out rebuilds it)"
        )
    tokens_file, index_file = path / manifest["tokens_file"], path / manifest["index_file"]
    if manifest.get("layout") == "megatron":
        index = read_index(index_file)
        tokens = open_tokens(index_file.with_suffix(""), index)
        return PreparedSet(path, manifest, tokens, DocumentOffsets(index), "megatron")
    tokens = np.memmap(tokens_file, dtype=np.dtype(manifest["dtype"]), mode="r", shape=(manifest["num_tokens"],))
    offsets = np.memmap(index_file, dtype=np.int64, mode="r", shape=(manifest["num_documents"] + 1,))
    return PreparedSet(path, manifest, tokens, offsets)


def check_compatible(prepared: PreparedSet, *, tokenizer_info: dict, vocab_size: int) -> None:
    """The run's tokenizer made this set, and every token id fits the model's embeddings.

    A set with pptk's manifest is checked by its record: the tokenizer's content hash and the largest token id. A
    Megatron set made elsewhere records neither, so it is checked by what it holds: its dtype can store the
    tokenizer's ids, sampled ids fit the tokenizer and the model, and sampled documents end with the tokenizer's eos.
    """
    if prepared.manifest is None:
        check_foreign(prepared, tokenizer_info=tokenizer_info, vocab_size=vocab_size)
        return
    made_by = prepared.manifest["tokenizer"]
    if made_by["hash"] != tokenizer_info["hash"]:
        raise PptkError(
            f"prepared set {str(prepared.path)!r} was made with tokenizer {made_by['name']!r} (hash "
            f"{made_by['hash'][:12]}), but this run uses {tokenizer_info['name']!r} (hash "
            f"{tokenizer_info['hash'][:12]}); prepare the data with the model's tokenizer or pass --tokenizer"
        )
    if prepared.manifest["max_token_id"] >= vocab_size:
        raise PptkError(
            f"prepared set {str(prepared.path)!r} holds token id {prepared.manifest['max_token_id']} but the "
            f"model's vocab_size is {vocab_size}; use the tokenizer the model was trained with, or resize the "
            "model's embeddings"
        )


@dataclass(frozen=True, eq=False)
class Blocks:
    """Consecutive ``block_size`` tokens of a token range [begin, end) of a prepared set; the tail is dropped."""

    tokens: np.ndarray
    begin: int
    end: int
    block_size: int

    def __len__(self) -> int:
        return (self.end - self.begin) // self.block_size

    def read(self, index: int) -> np.ndarray:
        start = self.begin + index * self.block_size
        return np.asarray(self.tokens[start : start + self.block_size], dtype=np.int64)


def split_by_document(prepared: PreparedSet, *, eval_fraction: float, block_size: int) -> tuple[Blocks, Blocks | None]:
    """(train, eval) blocks: the last ``eval_fraction`` of the documents are held out, whole (as Megatron's split).

    A set of one document has no eval part (None); every other set keeps at least one document for each side.
    """
    if not 0 <= eval_fraction < 1:
        raise PptkError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    documents = prepared.num_documents
    held_out = min(round(documents * eval_fraction), documents - 1)
    if eval_fraction > 0 and documents > 1:
        held_out = max(held_out, 1)
    cut = int(prepared.offsets[documents - held_out])
    train = Blocks(prepared.tokens, 0, cut, block_size)
    if len(train) == 0:
        raise PptkError(
            f"prepared set {str(prepared.path)!r} has {cut} training tokens, fewer than one block of {block_size}; "
            "give more text, a smaller --seq-len or a smaller --eval-fraction"
        )
    evaluation = Blocks(prepared.tokens, cut, len(prepared.tokens), block_size) if held_out else None
    return train, (evaluation if evaluation is not None and len(evaluation) else None)


# --- the constant-memory permutation and the blend ----------------------------------------------------------------


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash (wrapping uint64 arithmetic)."""
    z = values.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return z ^ (z >> np.uint64(31))


def _key(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0])


def permute(positions: np.ndarray, n: int, *, key: int) -> np.ndarray:
    """A keyed bijection of [0, n) applied to ``positions``: 4 Feistel rounds with cycle walking."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    key_bits = np.uint64(key)

    def once(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for round_ in range(4):
            with np.errstate(over="ignore"):
                f = _mix(right ^ key_bits ^ np.uint64(round_ * 0x1000193)) & mask
            left, right = right, left ^ f
        return (left << shift) | right

    x = once(np.asarray(positions, dtype=np.uint64))
    outside = x >= np.uint64(n)
    while outside.any():  # cycle walking: a permutation of the power-of-four domain restricted to [0, n)
        x[outside] = once(x[outside])
        outside = x >= np.uint64(n)
    return x.astype(np.int64)


@dataclass(frozen=True, eq=False)
class Blend:
    """Blocks of one or more sets, drawn by global sample index with the given weights (summing to 1)."""

    members: tuple[Blocks, ...]
    weights: tuple[float, ...]
    seed: int

    def __len__(self) -> int:
        return sum(len(p) for p in self.members)

    def choose(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(set, block) of each global sample index."""
        samples = np.asarray(samples, dtype=np.int64)
        if len(self.members) == 1:
            which = np.zeros(len(samples), dtype=np.int64)
        else:
            uniform = (_mix(samples.astype(np.uint64) ^ np.uint64(_key(self.seed, 1))) >> np.uint64(11)) / float(
                1 << 53
            )
            which = np.searchsorted(np.cumsum(self.weights)[:-1], uniform, side="right")
        sizes = np.array([len(p) for p in self.members], dtype=np.int64)[which]
        epochs = samples // sizes
        blocks = np.empty(len(samples), dtype=np.int64)
        for part, epoch in {(int(w), int(e)) for w, e in zip(which, epochs)}:  # one permutation per (set, pass)
            rows = (which == part) & (epochs == epoch)
            n = len(self.members[part])
            blocks[rows] = permute(samples[rows] % n, n, key=_key(self.seed, part, epoch))
        return which, blocks

    def read(self, samples: np.ndarray) -> torch.Tensor:
        """[len(samples), block_size] int64 token ids."""
        which, blocks = self.choose(samples)
        return torch.from_numpy(np.stack([self.members[w].read(int(b)) for w, b in zip(which, blocks)]))


def blend(parts: Sequence[Blocks], weights: Sequence[float] | None, *, seed: int) -> Blend:
    """Normalised weights; without weights, sets are drawn in proportion to their blocks (plain concatenation)."""
    if weights is None:
        weights = [float(len(p)) for p in parts]
    if len(weights) != len(parts) or any(not math.isfinite(w) or w <= 0 for w in weights):
        raise PptkError(f"blend weights must be positive, one per set; got {list(weights)} for {len(parts)} sets")
    total = float(sum(weights))
    return Blend(tuple(parts), tuple(w / total for w in weights), seed)
