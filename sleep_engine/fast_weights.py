"""Tier 1, the fast weights B_h A_h: test-time learning during Wake (docs/DESIGN.md §3).

Tier 1 is the high-frequency memory: quick to learn what this conversation brings, quick to
forget, harmless to everything else. One update is a few AdamW steps, on B_h A_h only, of

    L = Σ_t w_t · CE_t / Σ_t w_t  +  κ · KL(p_without ‖ p_with) on anchors (plain text and chat)

- w_t = 1 on what the user brings (taught texts, the user's messages), `self_weight` on the
  model's own replies (default 0: training on its own words is what collapsed the first version
  into tautologies within 40 turns), 0 on the system prompt.
- Before each update B_h decays: B_h ← (1 − decay)·B_h (the forgetting gate of Titans/Hope).
- After it, a guard measures the drift exp(CE_with − CE_without) − 1 on two held-out sets, plain
  anchor text and everyday questions with the model's own (tier-1-off) answers, and halves B_h
  until both are within `max_drift` and at most `max_changed` of those answers' greedy tokens
  differ. The chat set is there because plain text alone missed the
  damage: with a text-only guard at ≤ 1%, two updates of chat already took everyday questions
  from 20/30 to 15/30 (docs/results/wake_*.json).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ASSETS
from .chat_format import encode_chat, encode_text
from .config import WakeConfig
from .consolidation import ANCHOR_PROMPTS, GATE_NEGATIVE_PROMPTS, subjects
from .losses import weighted_lm_loss
from .memory import MemoryModel
from .probes import ANSWER_PROMPT, shared_prefix_pass
from .readings import digest
from .sampling import chat_ids, common_prefix
from .store import Episode

ANCHOR_TEXT = ASSETS / "anchor_text.txt"
MAX_SHRINKS = 6     # 2^-6 of the update left; beyond that the update is undone
# of the anchor paragraphs, the ones the guard measures: one forward per check, so few and short
# (8 × 48 tokens cost more than the 4 training steps of a chat turn on 2 busy cores)
GUARD_PARAGRAPHS = 4
# everyday questions the chat guard measures (disjoint from the lab's scored general questions,
# assets/general_questions.jsonl); the chat KL anchors are the generic requests of consolidation
GUARD_QUESTIONS = GATE_NEGATIVE_PROMPTS[:12]
REFERENCE_ANSWER_TOKENS = 24


@dataclass
class GuardReading:
    text_ce: float             # mean next-token CE on the guard paragraphs
    chat_ce: float             # mean CE of the guard chats' reference answers
    choices: torch.Tensor      # argmax token at each answer position of the guard chats

    def to_json(self) -> list:
        return [self.text_ce, self.chat_ce, self.choices.tolist()]

    @classmethod
    def from_json(cls, value: list, device) -> "GuardReading":
        return cls(value[0], value[1], torch.tensor(value[2], dtype=torch.long, device=device))


@dataclass
class WeightedText:
    ids: list[int]
    weights: list[float]


def _chat_turn(tokenizer, system_prompt: str, user: str, reply: str, user_weight: float,
               reply_weight: float) -> WeightedText:
    """A one-turn chat with weight 0 on the system prompt, `user_weight` on the user's turn and
    `reply_weight` on the reply (a token the tokenizer merged across the boundary counts as reply)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    full = encode_chat(tokenizer, system + msgs, add_generation_prompt=False)
    head = common_prefix([encode_chat(tokenizer, system, add_generation_prompt=False), full]) if system else 0
    asked = common_prefix([encode_chat(tokenizer, system + msgs[:1]), full])
    weights = [0.0] * head + [user_weight] * (asked - head) + [reply_weight] * (len(full) - asked)
    return WeightedText(full, weights)


def episode_tokens(tokenizer, episode, cfg: WakeConfig, max_tokens: int = 512) -> list[WeightedText]:
    """What tier 1 trains on for one episode, each token with its loss weight (module docstring).
    A chat turn is laid out as the chat it was. A taught text is plain text, plus the text as the
    answer to "Tell me about X." for the first `fast_teach_prompts` subjects it names (the user's
    words in the place a question about them will look)."""
    msgs = episode.messages or []
    out: list[WeightedText] = []
    if episode.kind == "turn" and len(msgs) >= 2:
        out.append(_chat_turn(tokenizer, cfg.system_prompt, msgs[0]["content"], msgs[-1]["content"],
                              1.0, cfg.fast_self_weight))
    else:
        ids = encode_text(tokenizer, episode.text)
        out.append(WeightedText(ids, [1.0] * len(ids)))
        for name in subjects(episode.text)[:cfg.fast_teach_prompts]:
            out.append(_chat_turn(tokenizer, cfg.system_prompt, f"Tell me about {name}.", episode.text, 0.0, 1.0))
    return [_trim(t, max_tokens) for t in out]


def _trim(t: WeightedText, max_tokens: int) -> WeightedText:
    """Cut at max_tokens and after the last token that counts: a reply at weight 0 costs nothing."""
    end = min(max_tokens, max((i + 1 for i, w in enumerate(t.weights) if w > 0), default=0))
    return WeightedText(t.ids[:end], t.weights[:end])


def anchor_paragraphs(tokenizer, max_tokens: int = 32) -> list[list[int]]:
    paragraphs = [p.strip() for p in ANCHOR_TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return [tokenizer(p, add_special_tokens=False)["input_ids"][:max_tokens] for p in paragraphs]


def _pad(seqs: list[list], value) -> list[list]:
    width = max(len(s) for s in seqs)
    return [list(s) + [value] * (width - len(s)) for s in seqs]


class FastWeightLearner:
    """Updates tier 1 from episodes and keeps it within its bound (see module docstring)."""

    def __init__(self, memory: MemoryModel, tokenizer, cfg: WakeConfig):
        self.memory, self.lm, self.tok, self.cfg = memory, memory.lm, tokenizer, cfg
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.anchors = [a for a in anchor_paragraphs(tokenizer) if len(a) > 1]
        self.guard_set = self.anchors[:GUARD_PARAGRAPHS]
        self._turn = 0   # updates so far: which anchors the next KL term uses (rotates over all of them)

    def _batch(self, seqs: list[list[int]], weights: list[list[float]] | None = None):
        dev = next(self.lm.parameters()).device
        ids = torch.tensor(_pad(seqs, self.pad), device=dev)
        mask = torch.tensor(_pad([[1] * len(s) for s in seqs], 0), device=dev)
        w = torch.tensor(_pad(weights, 0.0), device=dev) if weights is not None else mask.float()
        return ids, mask, w

    @torch.no_grad()
    def reference_chats(self) -> dict[str, list[WeightedText]]:
        """Chats answered by the model without tier 1 (greedy, answer tokens weighted 1): "guard"
        (everyday questions, measured after every update) and "kl" (generic requests, pulled back
        to during the steps). Generated once per expert state (~22 short answers; only tier 1
        moves during Wake, so they hold until a sleep or an undo: readings.py)."""
        system = self.cfg.system_prompt or None
        prompts = ([chat_ids(self.tok, ANSWER_PROMPT.format(q=q), system) for q in GUARD_QUESTIONS]
                   + [chat_ids(self.tok, p, system) for p in ANCHOR_PROMPTS])
        with self.memory.configured(fast_weights=False):
            answers = self.memory.readings.answers(self.lm, self.tok, prompts, REFERENCE_ANSWER_TOKENS, keep=True)
        chats = [WeightedText(p + a, [0.0] * len(p) + [1.0] * len(a)) if a else None for p, a in zip(prompts, answers)]
        return {"guard": [c for c in chats[:len(GUARD_QUESTIONS)] if c],
                "kl": [c for c in chats[len(GUARD_QUESTIONS):] if c]}

    @torch.no_grad()
    def guard_reading(self, fast_weights: bool) -> GuardReading:
        """The guard sets read with or without tier 1 (the reading without is remembered per expert
        state): mean cross-entropy on the paragraphs and on the chats' answers, and the chats'
        greedy (argmax) token at every answer position."""
        chats = self.reference_chats()["guard"]
        if fast_weights:
            return self.read(chats, True)
        name = "guard:" + digest([self.guard_set, [c.ids for c in chats]])
        raw = self.memory.readings.remember(name, lambda: self.read(chats, False).to_json(), keep=True)
        return GuardReading.from_json(raw, next(self.lm.parameters()).device)

    @torch.no_grad()
    def read(self, chats: list[WeightedText], fast_weights: bool) -> GuardReading:
        """The guard paragraphs' CE and `chats`' answer CE and greedy choices, as the model is now
        (a sleep compares its result with the pre-sleep model's reading of the same chats)."""
        with self.memory.configured(fast_weights=fast_weights):
            ids, mask, w = self._batch(self.guard_set)
            text = float(weighted_lm_loss(self.lm(input_ids=ids, attention_mask=mask).logits, ids, w))
            ids, _, w = self._batch([c.ids for c in chats], [c.weights for c in chats])
            first = min(next((i for i, x in enumerate(c.weights) if x > 0), len(c.ids)) for c in chats)
            out, P, _ = shared_prefix_pass(self.lm, [c.ids for c in chats], self.pad, first - 1)   # the template once
        ids, w, logits = ids[:, P:], w[:, P:], out.logits   # unweighted before the first answer token
        answer = w[:, 1:] > 0          # logits[:, t−1] predict the answer token at t
        return GuardReading(text, float(weighted_lm_loss(logits, ids, w)), logits[:, :-1].argmax(-1)[answer])

    def drift_parts(self) -> dict[str, float]:
        """What tier 1 changes on the guard sets: `text` and `chat`, exp(CE with − CE without) − 1
        (+0.02 = 2% higher perplexity), and `changed`, the share of the chats' answer tokens whose
        greedy choice differs (a greedy answer changes where one of its choices does)."""
        if self.memory.fast_weight_norm() == 0:
            return {"text": 0.0, "chat": 0.0, "changed": 0.0}
        on, off = self.guard_reading(True), self.guard_reading(False)
        return {"text": math.exp(on.text_ce - off.text_ce) - 1, "chat": math.exp(on.chat_ce - off.chat_ce) - 1,
                "changed": float((on.choices != off.choices).float().mean()) if off.choices.numel() else 0.0}

    def drift(self) -> float:
        return perplexity_drift(self.drift_parts())

    def within_bound(self) -> tuple[bool, dict]:
        parts = self.drift_parts()
        ok = perplexity_drift(parts) <= self.cfg.fast_max_drift and parts["changed"] <= self.cfg.fast_max_changed
        return ok, parts

    def update(self, episodes, steps: int | None = None) -> dict:
        """Decay, a few steps of the weighted LM loss + KL to the model without tier 1, guard.
        `episodes` may also be plain strings (taken as taught texts)."""
        cfg, t0 = self.cfg, time.perf_counter()
        episodes = [Episode(0, "taught", e) if isinstance(e, str) else e for e in episodes]
        taught = any(e.kind == "taught" for e in episodes)
        steps = steps or (cfg.fast_teach_steps if taught else cfg.fast_update_steps)
        texts = [t for e in episodes for t in episode_tokens(self.tok, e, cfg)]
        texts = [t for t in texts if len(t.ids) > 1 and sum(t.weights[1:]) > 0]
        if not texts:
            return {"steps": 0, "texts": 0, "skipped": "nothing the user brought to learn from"}
        n = len(texts)
        chats = self.reference_chats()["kl"] if cfg.fast_kl_chats else []
        k, c = cfg.fast_kl_anchors, cfg.fast_kl_chats
        chosen = ([self.anchors[(self._turn * k + j) % len(self.anchors)] for j in range(k)]
                  + [chats[(self._turn * c + j) % len(chats)].ids for j in range(c) if chats])
        self._turn += 1
        ids, mask, w = self._batch([t.ids for t in texts] + chosen,
                                   [t.weights for t in texts] + [[0.0] * len(a) for a in chosen])
        with torch.no_grad(), self.memory.configured(fast_weights=False):
            ref = F.log_softmax(self.lm(input_ids=ids[n:], attention_mask=mask[n:]).logits.float(), -1)
        self.memory.scale_fast_weights(1 - cfg.fast_decay)
        kept = [p.detach().clone() for p in self.memory.fast_weight_params()]   # what the guard falls back to
        params = self.memory.train_only(fast_weights=True)
        opt = torch.optim.AdamW(params, lr=cfg.fast_lr, weight_decay=0.0)
        losses, kls = [], []
        try:
            for _ in range(steps):
                logits = self.lm(input_ids=ids, attention_mask=mask).logits
                lm_loss = weighted_lm_loss(logits[:n], ids[:n], w[:n])
                kl = _kl(ref, logits[n:], mask[n:]) if chosen else lm_loss.new_zeros(())
                loss = lm_loss + cfg.fast_kl_weight * kl
                if not torch.isfinite(loss):   # never let a bad step into tier 1: undo the update
                    self._restore(kept)
                    return {"steps": 0, "texts": n, "skipped": "the loss was not finite; update undone"}
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(lm_loss.detach()))
                kls.append(float(kl.detach()))
        finally:
            self.memory.freeze_all()
        parts, shrinks, undone = self.guard(kept)
        drift = perplexity_drift(parts)
        self.memory.fast_weight_steps += steps
        self.memory.fast_weight_time = time.time()
        self.memory.fast_weight_drift = drift
        # loss_after is the last step's loss (before its own step): one forward fewer per update
        return {"loss_before": losses[0], "loss_after": losses[-1], "kl_first": kls[0], "kl_last": kls[-1],
                "drift": drift, "changed": parts["changed"], "shrinks": shrinks, "undone": undone, "steps": steps, "texts": n,
                "seconds": round(time.perf_counter() - t0, 3), "time": time.time()}

    @torch.no_grad()
    def guard(self, fallback: list[torch.Tensor]) -> tuple[dict, int, bool]:
        """Halve B_h until tier 1 is within its bound (within_bound); if that fails, undo this
        update (back to `fallback`, tier 1 as it was before the update's steps).
        Returns (drift_parts, halvings, undone)."""
        (ok, parts), shrinks = self.within_bound(), 0
        while not ok and shrinks < MAX_SHRINKS:
            self.memory.scale_fast_weights(0.5)
            shrinks += 1
            ok, parts = self.within_bound()
        if ok:
            return parts, shrinks, False
        self._restore(fallback)
        return self.drift_parts(), shrinks, True

    @torch.no_grad()
    def _restore(self, saved: list[torch.Tensor]) -> None:
        for p, value in zip(self.memory.fast_weight_params(), saved):
            p.copy_(value)


def perplexity_drift(parts: dict[str, float]) -> float:
    """The larger of the guard's two perplexity drifts (FastWeightLearner.drift_parts)."""
    return max(parts["text"], parts["chat"])


def _kl(ref_logp: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of KL(p_ref ‖ p): the pull back to the model without tier 1."""
    logp = F.log_softmax(logits.float(), -1)
    per_token = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1)
