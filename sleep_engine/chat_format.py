"""Chat prompts in which what a person typed stays text (docs/reliability.md, "input is text").

`tokenizer.apply_chat_template(..., tokenize=True)` renders the template to one string and then
tokenizes it, so a user who types `<|im_start|>system …` gets a real special token: a forged
system turn, logged and trained on by the next sleep. Here the template is rendered around
placeholders; the template's own parts are tokenized as usual (its special tokens are
structure) and every message's content with `split_special_tokens=True` (its special-token
strings are plain characters). For ordinary text the ids equal apply_chat_template's.
"""
from __future__ import annotations

import re

_OPEN, _CLOSE = "\ue000", "\ue001"      # private-use characters: in no chat template
_SLOT = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of `text` as plain text: special-token strings in it are not special."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _special_strings(tokenizer) -> list[str]:
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok))
    return sorted((s for s in specials if s), key=len, reverse=True)


def generated_ids(tokenizer, message: dict) -> list[int] | None:
    """The ids a reply was generated as (`message["ids"]`), where they are that content exactly
    and hold no special token; else None (the content is then tokenized as text)."""
    ids = message.get("ids")
    if not ids or set(ids) & set(getattr(tokenizer, "all_special_ids", []) or []):
        return None
    return list(ids) if tokenizer.decode(ids) == message.get("content") else None


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` in the tokenizer's chat template, every content kept as text.

    The template is rendered with a placeholder per content; the special tokens of that rendering
    are the template's own (structure). Between them, template text and contents are joined and
    tokenized with `split_special_tokens=True`, so a content's special-token strings stay characters
    and, as the native tokenizer also splits at special tokens, ordinary text gets the same ids.
    A reply that carries the ids it was generated as keeps them (`generated_ids`): tokenized
    again, a generated "\n\n" came back as two "\n" and the next turn's prompt no longer
    matched the decoder's cache (a 95-token prefill, first token 242 ms against ~60)."""
    contents = [str(m.get("content", "")) for m in messages]
    kept = [generated_ids(tokenizer, m) for m in messages]
    slotted = [dict(m, content=f"{_OPEN}{i}{_CLOSE}") for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(slotted, add_generation_prompt=add_generation_prompt, tokenize=False)
    specials = _special_strings(tokenizer)
    parts = re.split("(" + "|".join(map(re.escape, specials)) + ")", rendered) if specials else [rendered]
    ids: list[int] = []
    for i, part in enumerate(parts):
        if not part:
            continue
        if i % 2:   # a special token the template wrote
            ids.append(tokenizer.convert_tokens_to_ids(part))
            continue
        text = ""   # template text and contents, tokenized together up to a reply's own ids
        for j, piece in enumerate(_SLOT.split(part)):   # text, slot number, text, …
            if j % 2 and kept[int(piece)] is not None:
                ids += (encode_text(tokenizer, text) if text else []) + kept[int(piece)]
                text = ""
            else:
                text += contents[int(piece)] if j % 2 else piece
        if text:
            ids += encode_text(tokenizer, text)
    return ids


class WakeInputError(ValueError):
    """The message or text cannot be used (empty, binary, ...); nothing was changed."""


def clean_text(text, what: str, max_chars: int) -> tuple[str, list[str]]:
    """Validate user text: a clear error for empty/binary input, a notice when it is cut."""
    if not isinstance(text, str):
        raise WakeInputError(f"{what} must be text")
    if "\x00" in text:
        raise WakeInputError(f"{what} looks like binary data (contains NUL bytes)")
    if not text.strip():
        raise WakeInputError(f"{what} is empty")
    notices = []
    if len(text) > max_chars:
        notices.append(f"{what} was {len(text):,} characters; only the first {max_chars:,} were used")
        text = text[:max_chars]
    return text, notices
