# Chats to fine-tune on without any download: arithmetic conversations and a ChatML tokenizer (the demo's BPE).
"""Used by the SFT tests and ``benchmarks/sft_packing.py``; the answers differ in length, so rows carry uneven
numbers of supervised tokens, and every third conversation has a second turn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pptk.data.demo import demo_corpus, train_demo_tokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def demo_conversations(count: int, *, seed: int) -> list[dict]:
    """``count`` records in the chat ``messages`` format."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        a, b = (int(x) for x in rng.integers(1, 50, size=2))
        answer = f"{a} plus {b} is {a + b}." + (" That is the sum." * int(rng.integers(0, 3)))
        messages = [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": answer}]
        if i % 3 == 0:
            messages += [
                {"role": "user", "content": "And doubled?"},
                {"role": "assistant", "content": f"{2 * (a + b)}"},
            ]
        records.append({"messages": messages})
    return records


def demo_chat_tokenizer(out_dir: Path, *, vocab_size: int = 512) -> Any:
    """The demo's byte-level BPE with ChatML's turn tokens, a pad token and the ChatML template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        train_demo_tokenizer(text=demo_corpus()[:200_000], vocab_size=vocab_size, out_dir=out_dir)
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "pad_token": "<pad>"})
    tokenizer.chat_template = CHATML
    return tokenizer
