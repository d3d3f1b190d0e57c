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


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` in the tokenizer's chat template, every content kept as text."""
    contents = [str(m.get("content", "")) for m in messages]
    slotted = [dict(m, content=f"{_OPEN}{i}{_CLOSE}") for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(slotted, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids: list[int] = []
    pos = 0
    for m in _SLOT.finditer(rendered):
        if m.start() > pos:
            ids += tokenizer(rendered[pos:m.start()], add_special_tokens=False)["input_ids"]
        if contents[int(m.group(1))]:
            ids += encode_text(tokenizer, contents[int(m.group(1))])
        pos = m.end()
    if pos < len(rendered):
        ids += tokenizer(rendered[pos:], add_special_tokens=False)["input_ids"]
    return ids
