"""Batched sampling for Sleep (teacher answers, student completions, dreams)."""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from time import perf_counter

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .config import SYSTEM_PROMPT

_thread = threading.local()


@contextmanager
def cancel_points(check):
    """Inside the block, every `generate_batch` of this thread calls `check()` after each new
    token; `check` raises to stop (a sleep's Stop then lands within a token, not after a whole
    batch of teacher answers). Other threads (chat during a sleep) are not affected."""
    saved = getattr(_thread, "check", None)
    _thread.check = check
    try:
        yield
    finally:
        _thread.check = saved


class _CheckEachToken(StoppingCriteria):
    def __init__(self, check):
        self.check = check

    def __call__(self, input_ids, scores, **kwargs):
        self.check()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def chat_ids(tokenizer, user: str, system: str | None = None, assistant_prefix: str = "") -> list[int]:
    """Token ids of a one-turn chat prompt, ready for the assistant's reply (or its continuation).
    Without `system`, the lab's chat system prompt."""
    from .chat_format import encode_chat, encode_text
    msgs = [{"role": "system", "content": system or SYSTEM_PROMPT}, {"role": "user", "content": user}]
    ids = encode_chat(tokenizer, msgs)   # an episode's text stays text, even if it spells a template token
    if assistant_prefix:
        ids += encode_text(tokenizer, assistant_prefix)
    return ids


@torch.no_grad()
def generate_batch(lm, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, batch_size: int = 16, return_logits: bool = False,
                   deadline=None):
    """New token ids for each prompt (left-padded batches through transformers' generate),
    cut at the first end-of-turn token. With return_logits, also the logits that produced each
    kept token ((n, vocab) bfloat16 per prompt): a teacher's distributions come for free.
    With a `deadline` (budget.Deadline) the answers cover a prefix of `prompts` (at least the
    first batch), so callers put what matters most first: after the first batch, a batch holds
    only the prompts that the last batch's pace (seconds per prompt) says end before the deadline.
    Why sized, not just "none after it": one 32-prompt teacher batch started just before its
    deadline overran it by 17 s on a slow machine, and the sleep's steps paid for it (one of 18)."""
    from .decoding import stop_token_ids
    stops = stop_token_ids(tokenizer, lm)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dev = next(lm.parameters()).device
    out: list[list[int]] = []
    logits_out: list[torch.Tensor] = []
    torch.manual_seed(seed)
    i, pace = 0, 0.0
    while i < len(prompts):
        left = math.inf if not i or deadline is None else deadline.left()   # NEVER (no budget) is inf too
        size = batch_size if math.isinf(left) else min(batch_size, int(left // max(pace, 1e-9)))
        if size < 1:
            break
        chunk, started = prompts[i:i + size], perf_counter()
        i += len(chunk)
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=dev)
        kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False}
        check = getattr(_thread, "check", None)
        if check is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_CheckEachToken(check)])
        res = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                          pad_token_id=pad, eos_token_id=sorted(stops), output_logits=return_logits,
                          return_dict_in_generate=True, **kwargs)
        steps = torch.stack(res.logits, 1).to(torch.bfloat16) if return_logits else None  # (batch, new, vocab)
        for r, row in enumerate(res.sequences[:, width:].tolist()):
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            out.append(row[:cut])
            if return_logits:
                logits_out.append(steps[r, :cut].clone())
        pace = (perf_counter() - started) / len(chunk)
    return (out, logits_out) if return_logits else out
