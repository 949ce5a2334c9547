# `pptk data inspect`: what a token set holds (either layout), its first document, and whether a tokenizer fits it.
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pptk.data.blocks import PreparedSet, check_compatible, open_prepared
from pptk.data.megatron import DocumentOffsets
from pptk.data.prepare import INDEX_FILE, MANIFEST_FILE, TOKENS_FILE, load_tokenizer, tokenizer_fingerprint
from pptk.data.vocabulary import sampled_token_range
from pptk.errors import PptkError

PREVIEW_TOKENS = 256  # of the first document: enough to recognise the text


@dataclass(frozen=True)
class Inspection:
    text: str
    problem: str | None  # the compatibility check's error when a tokenizer was given and does not fit


def inspect_set(path: str | Path, *, tokenizer: Any = None) -> Inspection:
    """Counts, dtype, documents, tokens, the largest id and the first document (decoded when a tokenizer is given,
    which is then checked against the set as a training run checks it, with the tokenizer's size as vocab_size)."""
    prepared = open_prepared(path)
    lines = [str(prepared.path), *(f"  {key:<12} {value}" for key, value in _facts(prepared).items())]
    first = np.asarray(prepared.tokens[prepared.offsets[0] : prepared.offsets[1]])
    shown = first[:PREVIEW_TOKENS]
    cut = f", the first {len(shown)} shown" if len(shown) < len(first) else ""
    lines.append(f"  first document ({len(first):,} tokens{cut}):")
    problem = None
    if tokenizer is None:
        lines.append("    " + " ".join(str(int(i)) for i in shown))
        lines.append("  (token ids: give --tokenizer to see the text and check the set against it)")
        return Inspection("\n".join(lines), None)
    tokenizer = load_tokenizer(tokenizer)
    lines += [f"    {line}" if line.strip() else "" for line in tokenizer.decode(shown.tolist()).splitlines()]
    try:
        check_compatible(prepared, tokenizer_info=tokenizer_fingerprint(tokenizer), vocab_size=len(tokenizer))
    except PptkError as err:
        problem = str(err)
    lines.append(f"  tokenizer {tokenizer.name_or_path!r}: " + ("does not fit" if problem else "fits the set"))
    return Inspection("\n".join(lines), problem)


def _facts(prepared: PreparedSet) -> dict[str, str]:
    m = prepared.manifest
    if isinstance(prepared.offsets, DocumentOffsets):  # a Megatron set
        index = prepared.offsets.index
        made = f"prepared by pptk ({MANIFEST_FILE})" if m is not None else "no pptk manifest"
        facts = {
            "format": f"megatron ({index.path.with_suffix('.bin').name} + {index.path.name}), {made}",
            "sequences": f"{index.num_sequences:,}",
        }
    else:
        facts = {"format": f"pptk ({TOKENS_FILE} + {INDEX_FILE} + {MANIFEST_FILE})"}
    facts |= {
        "dtype": str(prepared.tokens.dtype),
        "documents": f"{prepared.num_documents:,}",
        "tokens": f"{prepared.num_tokens:,} ({prepared.tokens.nbytes / 1e6:,.1f} MB)",
    }
    if m is not None:
        made_by = m["tokenizer"]
        facts["largest id"] = f"{m['max_token_id']} (recorded at prepare)"
        facts["tokenizer"] = f"{made_by['name']} (sha256 {made_by['hash'][:12]}, eos {made_by['eos_id']})"
    else:
        _, high, seen = sampled_token_range(prepared.tokens)
        facts["largest id"] = f"{high} (sampled: {seen:,} of {prepared.num_tokens:,} tokens)"
        facts["tokenizer"] = "not recorded (a Megatron set made elsewhere)"
    return facts
