# The chat template (the tokenizer's or a file's) and conversations tokenized with it, answers marked for the loss.
"""Which tokens are trained on (``supervised``), by default the assistant answers only, each with its end-of-turn
token, found by one of the two maintained mechanisms:

- ``generation``: the template marks answers with ``{% generation %}`` ... ``{% endgeneration %}`` and the tokenizer
  is fast: transformers' ``apply_chat_template(..., return_assistant_tokens_mask=True)``;
- ``prefix`` (TRL's approach, for every other template): render ``messages[:i]`` with ``add_generation_prompt=True``
  and ``messages[:i+1]``; the tokens in between are answer i, end-of-turn included. Both renderings must tokenize
  to a prefix of the whole conversation's tokens, or the answer cannot be located: that is an error.

transformers answers a template without markers with an all-zero mask and a log line; pptk never asks it to (the
markers are looked for first), and a mask that still comes out all zeros or all ones is an error naming the record.
``train_on_prompt=True`` supervises every token instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pptk.data.chat import Conversation
from pptk.errors import PptkError
from pptk.logs import get_logger

log = get_logger(__name__)
# The pattern transformers itself uses to decide whether a template supports assistant masks.
GENERATION_MARKER = re.compile(r"\{\%-?\s*generation\s*-?\%\}")


@dataclass(frozen=True)
class ChatTemplate:
    text: str  # the Jinja source
    source: str  # where it came from, for messages: "the tokenizer's chat template" or "chat template file X"

    @property
    def has_generation_markers(self) -> bool:
        return bool(GENERATION_MARKER.search(self.text))


@dataclass(frozen=True, eq=False)
class TokenizedConversation:
    input_ids: np.ndarray  # int32 [n]
    supervised: np.ndarray  # bool [n]: True where the token is a training target
    where: str  # the record's "file:line"

    def __len__(self) -> int:
        return len(self.input_ids)


def resolve_chat_template(tokenizer: Any, template_file: str | Path | None = None) -> ChatTemplate:
    """The template file's when one is given (it overrides the tokenizer's), else the tokenizer's; an error if neither.

    A template file holds the Jinja text itself (.jinja, .txt, ...) or is a JSON file with a "chat_template" string
    (chat_template.json, tokenizer_config.json).
    """
    if template_file is not None:
        template = ChatTemplate(read_template_file(template_file), f"chat template file {template_file}")
        if _tokenizer_template(tokenizer) is not None:
            log.info("using %s instead of the tokenizer's own chat template", template.source)
        return template
    text = _tokenizer_template(tokenizer)
    if text is None:
        raise PptkError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no chat template "
            "and no template file was given: pass a Jinja chat template file (for instance the chat_template.jinja "
            "of the instruction-tuned model this base model belongs to)"
        )
    return ChatTemplate(text, "the tokenizer's chat template")


def read_template_file(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise PptkError(f"chat template file {str(path)!r} does not exist; check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PptkError(f"chat template file {str(path)!r} is not UTF-8 text; save it as UTF-8") from None
    if path.suffix == ".json":
        try:
            found = json.loads(text).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            found = None
        if not isinstance(found, str):
            raise PptkError(
                f'chat template file {str(path)!r} is JSON without a "chat_template" string; give a file holding '
                'the Jinja template itself, or a JSON object with a "chat_template" key'
            )
        text = found
    if not text.strip():
        raise PptkError(f"chat template file {str(path)!r} is empty; write the Jinja chat template into it")
    return text


def _tokenizer_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the "default" one is the chat template
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def mask_method(tokenizer: Any, template: ChatTemplate) -> str:
    """How answers are found: "generation" when transformers can mark them (markers, a fast tokenizer), else
    "prefix"."""
    return "generation" if template.has_generation_markers and getattr(tokenizer, "is_fast", False) else "prefix"


def tokenize_conversations(
    conversations: Sequence[Conversation], tokenizer: Any, template: ChatTemplate, *, train_on_prompt: bool = False
) -> list[TokenizedConversation]:
    """Each conversation rendered with ``template`` and tokenized, its answers (or every token) supervised."""
    method = mask_method(tokenizer, template)
    if template.has_generation_markers and method == "prefix":
        log.info("%s has {%% generation %%} markers, but only a fast tokenizer maps them to tokens", template.source)
    tokenized = [
        tokenize_conversation(c, tokenizer, template, train_on_prompt=train_on_prompt, method=method)
        for c in conversations
    ]
    if method == "generation" and not train_on_prompt and conversations:
        _compare_with_prefix_rendering(conversations[0], tokenized[0], tokenizer, template)
    return tokenized


def tokenize_conversation(
    conversation: Conversation,
    tokenizer: Any,
    template: ChatTemplate,
    *,
    train_on_prompt: bool = False,
    method: str | None = None,
) -> TokenizedConversation:
    """One conversation's tokens and supervised flags; method: "generation" or "prefix" (default: mask_method)."""
    method = method or mask_method(tokenizer, template)
    where = conversation.where
    if train_on_prompt:
        (ids,) = encode_texts(tokenizer, [render_chat(conversation.as_dicts(), tokenizer, template, where)])
        return TokenizedConversation(_ids(ids), np.ones(len(ids), dtype=bool), where)
    if method == "generation":
        ids, supervised = _generation_mask(conversation, tokenizer, template)
    else:
        ids, supervised = _prefix_mask(conversation, tokenizer, template)
    if not supervised.any() or supervised.all():
        what = "none" if not supervised.any() else "all"
        raise PptkError(
            f"{where}: {template.source} marks {what} of this conversation's {len(ids)} tokens as the answers "
            f"(method: {method}); "
            + (
                "put each assistant answer and its end-of-turn token, and only those, inside {% generation %} ... "
                "{% endgeneration %}, or remove the markers to locate answers by rendering prefixes"
                if method == "generation"
                else "the template must render user turns and assistant turns differently"
            )
        )
    return TokenizedConversation(_ids(ids), supervised, where)


def _generation_mask(
    conversation: Conversation, tokenizer: Any, template: ChatTemplate
) -> tuple[list[int], np.ndarray]:
    import jinja2

    try:
        out = tokenizer.apply_chat_template(
            conversation.as_dicts(),
            chat_template=template.text,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
    except jinja2.TemplateError as err:
        raise _template_error(err, conversation.where, template) from None
    return list(out["input_ids"]), np.asarray(out["assistant_masks"], dtype=bool)


def _prefix_mask(conversation: Conversation, tokenizer: Any, template: ChatTemplate) -> tuple[list[int], np.ndarray]:
    where = conversation.where
    answers = [turn for turn, m in enumerate(conversation.messages) if m.role == "assistant"]
    texts = [render_chat(conversation.as_dicts(), tokenizer, template, where)]
    for turn in answers:
        texts.append(render_chat(conversation.as_dicts(turn), tokenizer, template, where, prompt=True))
        texts.append(render_chat(conversation.as_dicts(turn + 1), tokenizer, template, where))
    full, *parts = encode_texts(tokenizer, texts)  # one call: batches are encoded much faster than strings one by one
    supervised = np.zeros(len(full), dtype=bool)
    for turn, prompt, answered in zip(answers, parts[0::2], parts[1::2]):
        for name, part in (("the prompt before", prompt), ("the conversation up to", answered)):
            if full[: len(part)] != part:
                raise _not_a_prefix(name, turn, part, full, tokenizer=tokenizer, where=where, template=template)
        if len(answered) <= len(prompt):
            raise PptkError(
                f"{where}: {template.source} renders no token for message {turn + 1} (assistant): "
                f"messages[:{turn + 1}] is no longer than messages[:{turn}] with the generation prompt; check the "
                "template's assistant branch"
            )
        supervised[len(prompt) : len(answered)] = True
    return full, supervised


def render_chat(
    messages: list[dict[str, str]], tokenizer: Any, template: ChatTemplate, where: str, *, prompt: bool = False
) -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template.text, tokenize=False, add_generation_prompt=prompt
        )
    except jinja2.TemplateError as err:
        raise _template_error(err, where, template) from None


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # As apply_chat_template tokenizes: the template writes bos/eos itself. verbose=False: a conversation may be
    # longer than model_max_length, truncation is the packer's decision.
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def _ids(ids: list[int]) -> np.ndarray:
    return np.asarray(ids, dtype=np.int32)


def _template_error(err: Exception, where: str, template: ChatTemplate) -> PptkError:
    import jinja2

    if isinstance(err, jinja2.TemplateSyntaxError):
        return PptkError(f"{template.source} is not valid Jinja (line {err.lineno}: {err.message}); fix the template")
    return PptkError(
        f"{where}: {template.source} refuses this conversation: {err}; fix the record's turns (many templates "
        "want user and assistant turns to alternate, a system turn only first) or remove it"
    )


def _not_a_prefix(
    name: str, turn: int, part: list[int], full: list[int], *, tokenizer: Any, where: str, template: ChatTemplate
) -> PptkError:
    at = next((k for k, (a, b) in enumerate(zip(part, full)) if a != b), min(len(part), len(full)))
    return PptkError(
        f"{where}: {template.source} tokenizes {name} message {turn + 1} (assistant) as {len(part)} tokens that are "
        f"not a prefix of the whole conversation's {len(full)} tokens (first difference at token {at}: "
        f"{tokenizer.decode(part[at : at + 3])!r} vs {tokenizer.decode(full[at : at + 3])!r}), so the answer cannot "
        "be located; a template that rewrites earlier turns needs {% generation %} markers around the answers (with "
        "a fast tokenizer), or train on every token (train_on_prompt=True)"
    )


def _compare_with_prefix_rendering(
    conversation: Conversation, tokenized: TokenizedConversation, tokenizer: Any, template: ChatTemplate
) -> None:
    """Warn when the {% generation %} blocks leave out tokens prefix rendering would train on, the classic miss
    being the end-of-turn token outside the block: a model that never learns to stop."""
    try:
        ids, supervised = _prefix_mask(conversation, tokenizer, template)
    except PptkError:
        return  # the template rewrites earlier turns: prefix rendering cannot serve as the reference
    if ids != tokenized.input_ids.tolist() or np.array_equal(supervised, tokenized.supervised):
        return
    left_out = _decoded_runs(tokenizer, ids, supervised & ~tokenized.supervised)
    added = _decoded_runs(tokenizer, ids, tokenized.supervised & ~supervised)
    if not left_out and not added:
        return
    log.warning(
        "%s: the {%% generation %%} blocks of %s differ from the answers found by rendering prefixes: they leave "
        "out %s and add %s; check that each block holds the answer and its end-of-turn token, and only those",
        conversation.where,
        template.source,
        left_out or "nothing",
        added or "nothing",
    )


def _decoded_runs(tokenizer: Any, ids: list[int], flags: np.ndarray) -> str:
    """The decoded text of each run of flagged tokens, comma-separated and quoted; runs of whitespace alone are
    left out (whether the newline after an end-of-turn token is trained on does not matter)."""
    runs: list[list[int]] = []
    for k, token in enumerate(ids):
        if flags[k]:
            if k == 0 or not flags[k - 1]:
                runs.append([])
            runs[-1].append(token)
    texts = [tokenizer.decode(run) for run in runs]
    return ", ".join(repr(text) for text in texts if text.strip())
