# Causal-LM data in memory: tokenize documents (eos between them), pack the tokens into blocks, split train/eval.
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pptk.errors import PptkError


def tokenize_texts(texts: Sequence[str], tokenizer: Any) -> np.ndarray:
    """Token ids of each text followed by the eos token, concatenated (int32)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise PptkError(
            f"tokenizer {type(tokenizer).__name__} has no eos token, so documents cannot be separated; "
            "set one (tokenizer.eos_token = ...) or use pptk.data.demo.train_demo_tokenizer, whose eos is "
            "<|endoftext|>"
        )
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
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise PptkError(
                f"text file {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason}); is it a binary file? "
                "Save it as UTF-8 text"
            ) from None
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
        raise PptkError(
            f"{ids.numel()} tokens are fewer than one block of block_size {block_size}; "
            "give more text or use a smaller block_size"
        )
    return ids[: n_blocks * block_size].reshape(n_blocks, block_size).clone()


def check_token_ids(ids: Any, *, vocab_size: int) -> None:
    """Raise if any id is outside [0, vocab_size): an embedding lookup would fail (or read garbage on GPU)."""
    ids = torch.as_tensor(np.asarray(ids))
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if high >= vocab_size or low < 0:
        raise PptkError(
            f"token ids span [{low}, {high}] but the model's vocab_size is {vocab_size}: the tokenizer "
            "and the model disagree; use the tokenizer the model was trained with, or resize the model's "
            "embeddings to len(tokenizer)"
        )


@dataclass(frozen=True, eq=False)
class LMBlocks:
    """Packed token blocks, [N, block_size] int64; row i is training example i."""

    tokens: torch.Tensor

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.tokens.dtype != torch.long:
            raise PptkError(
                f"LMBlocks needs a 2-D int64 tensor [N, block_size], got {self.tokens.dtype} "
                f"{tuple(self.tokens.shape)}; build it with LMBlocks.from_tokens"
            )

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
        raise PptkError(
            f"eval_fraction {eval_fraction} of {len(blocks)} blocks leaves {n_eval} for eval and "
            f"{len(blocks) - n_eval} for training; both need at least one: give more text, a smaller "
            "block_size, or another eval_fraction"
        )
    order = np.random.default_rng([seed]).permutation(len(blocks))
    eval_idx, train_idx = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    return LMBlocks(blocks.tokens[torch.from_numpy(train_idx)]), LMBlocks(blocks.tokens[torch.from_numpy(eval_idx)])
