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
def cancel_points(check, lm=None):
    """Inside the block, every `generate_batch` of this thread calls `check()` after each new
    token, and with `lm` each of its decoder layers calls it before its forward; `check` raises to
    stop. A sleep's Stop then lands within a layer, not after a whole forward: the teacher's first
    batch prefills 32 prompts in one forward, and a Stop there took 4.9–5.5 s (make stop-check).
    Other threads (chat during a sleep, on layers it shares) are not affected."""
    saved = getattr(_thread, "check", None)
    _thread.check = check
    layers = getattr(getattr(lm, "model", None), "layers", None) or []
    hooks = [layer.register_forward_pre_hook(_check_this_thread) for layer in layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        _thread.check = saved


def _check_this_thread(module, args) -> None:
    check = getattr(_thread, "check", None)
    if check is not None:
        check()


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


def common_prefix(seqs: list[list[int]], limit: int | None = None) -> int:
    """Length of the prefix every sequence of `seqs` shares, at most `limit` (default and at most:
    the shortest sequence's length)."""
    limit = min([len(s) for s in seqs] + ([limit] if limit is not None else []))
    n = 0
    while n < limit and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def prefix_cache(model, prefix: list[int], rows: int):
    """Keys and values of `prefix` read once through `model` (a transformers decoder, with or
    without its LM head), repeated for `rows` rows that continue it. None for an empty prefix."""
    from transformers import DynamicCache
    if not prefix:
        return None
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([prefix], device=next(model.parameters()).device), cache=cache, use_cache=True)
    cache.batch_repeat_interleave(rows)
    return cache


def prefix_groups(prompts: list[list[int]], new_tokens: int = 1, overhead: float = 4.0) -> list[tuple[int, list[int]]]:
    """`prompts` split into groups that are each read as one shared prefix plus every row's own
    tokens, as (the prefix's length, the rows); a prefix leaves each row at least one token.
    A group costs its prefix once, its rows' own tokens, and `overhead` prompt tokens per new
    token (a forward's fixed cost: each group is decoded on its own); starting from one group per
    row, the pair of groups whose merge saves most is merged while a merge saves anything. So a
    teacher's prompts fall into one group per episode (its ~85-token notes read once) plus one
    for the prompts without notes, whose few shared template tokens do not pay for a decode of
    their own. overhead = 4 is a rough figure (a decode step's fixed cost against a prompt token's
    in a batched forward, 2 cores); a quick sleep's teacher batches split the same for any value
    from 1 to 16 (worked out on dev p01–p02's first batch)."""
    groups = [[len(p) - 1, [r], len(p)] for r, p in enumerate(prompts)]   # prefix, rows, Σ row lengths
    fixed = overhead * new_tokens
    # common prefix of two groups' first rows (a merged group's is its lower): read once per pair,
    # not per pair and round — 72 teacher prompts over 6 episodes took 2.6 s, now 0.34 s (2 cores, busy)
    firsts: dict[tuple[int, int], int] = {}

    def cost(prefix, rows, total):
        return prefix + total - rows * prefix + fixed
    while len(groups) > 1:
        best = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                (pa, ra, ta), (pb, rb, tb) = groups[a], groups[b]
                key = (ra[0], rb[0])
                if key not in firsts:
                    firsts[key] = common_prefix([prompts[ra[0]], prompts[rb[0]]])
                shared = min(firsts[key], pa, pb)
                saved = cost(pa, len(ra), ta) + cost(pb, len(rb), tb) - cost(shared, len(ra) + len(rb), ta + tb)
                if saved > 0 and (best is None or saved > best[0]):
                    best = (saved, a, b, shared)
        if best is None:
            break
        _, a, b, shared = best
        groups[a] = [shared, sorted(groups[a][1] + groups[b][1]), groups[a][2] + groups[b][2]]
        del groups[b]
    return [(prefix, rows) for prefix, rows, _ in groups]


@torch.no_grad()
def greedy_shared_prefix(lm, prompts: list[list[int]], prefix: int, max_new_tokens: int, stops: set[int],
                         pad: int, check=None, return_logits: bool = False):
    """Greedy answers to `prompts` that share their first `prefix` tokens (a teacher's system
    prompt with its episode): the prefix runs once and its keys and values serve every row, the
    rows' own tokens sit after it, left-padded (prefix | pad | own), with their true positions.
    Returns (new token ids per row, cut at the first stop token; their logits, or None).
    Why not transformers' generate: it pads every row to the longest and reads each from its first
    token — a quick sleep's teacher prompts over dev passages are ~100 tokens, ~80 of them the
    episode's notes."""
    from transformers import DynamicCache
    dev = next(lm.parameters()).device
    cache = prefix_cache(lm.model, prompts[0][:prefix], len(prompts)) or DynamicCache(config=lm.config)
    own = [p[prefix:] for p in prompts]
    width = max(map(len, own))
    ids = torch.tensor([[pad] * (width - len(t)) + t for t in own], device=dev)
    mask = torch.tensor([[1] * prefix + [0] * (width - len(t)) + [1] * len(t) for t in own], device=dev)
    positions = torch.tensor([[prefix] * (width - len(t)) + list(range(prefix, prefix + len(t))) for t in own],
                             device=dev)
    out = lm(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
             logits_to_keep=1)
    nxt = positions[:, -1:] + 1
    tokens, logits = [], []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=dev)
    stop_ids = torch.tensor(sorted(stops), device=dev)
    for step in range(max_new_tokens):
        last = out.logits[:, -1].float()
        tok = last.argmax(-1)
        tokens.append(tok)
        if return_logits:
            logits.append(last.to(torch.bfloat16))
        done |= torch.isin(tok, stop_ids)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if check is not None:
            check()
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype, device=dev)], 1)
        out = lm(input_ids=tok[:, None], attention_mask=mask, position_ids=nxt, cache=cache, use_cache=True)
        nxt = nxt + 1
    rows = torch.stack(tokens, 1).tolist()
    steps = torch.stack(logits, 1) if return_logits else None
    answers, kept = [], []
    for r, row in enumerate(rows):
        cut = next((k for k, t in enumerate(row) if t in stops), len(row))
        answers.append(row[:cut])
        if return_logits:
            kept.append(steps[r, :cut].clone())
    return answers, (kept if return_logits else None)


def _grouped_greedy(lm, prompts: list[list[int]], max_new_tokens: int, stops: set[int], pad: int,
                    return_logits: bool) -> tuple[list, list]:
    """`greedy_shared_prefix` over each of `prefix_groups`, the answers back in prompt order."""
    got: list = [None] * len(prompts)
    for prefix, rows in prefix_groups(prompts, max_new_tokens):
        answers, logits = greedy_shared_prefix(lm, [prompts[r] for r in rows], prefix, max_new_tokens, stops,
                                               pad, getattr(_thread, "check", None), return_logits)
        for k, r in enumerate(rows):
            got[r] = (answers[k], logits[k] if return_logits else None)
    return [a for a, _ in got], [g for _, g in got]


@torch.no_grad()
def generate_batch(lm, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, batch_size: int = 16, return_logits: bool = False,
                   deadline=None, share_prefixes: bool = False):
    """New token ids for each prompt (left-padded batches through transformers' generate),
    cut at the first end-of-turn token. With return_logits, also the logits that produced each
    kept token ((n, vocab) bfloat16 per prompt): a teacher's distributions come for free.
    With a `deadline` (budget.Deadline) the answers cover a prefix of `prompts` (at least the
    first batch), so callers put what matters most first: after the first batch, a batch holds
    only the prompts that the last batch's pace (seconds per prompt) says end before the deadline.
    Why sized, not just "none after it": one 32-prompt teacher batch started just before its
    deadline overran it by 17 s on a slow machine, and the sleep's steps paid for it (one of 18).
    With `share_prefixes` (greedy only) a batch's rows that share a long prefix (a teacher's
    episode) are answered together by `greedy_shared_prefix`, the prefix read once."""
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
        if share_prefixes and temperature <= 0:
            answers, logits = _grouped_greedy(lm, chunk, max_new_tokens, stops, pad, return_logits)
            out += answers
            logits_out += logits if return_logits else []
            pace = (perf_counter() - started) / len(chunk)
            continue
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
