"""Sleep phase 2, dreaming (docs/DESIGN.md §5): sample dreams with one extra random expert per router,
score them by gradient norm, try each kept dream on an isolated copy of the trainable parameters,
and fine-tune the new expert on the dreams that helped (ReST-EM)."""
from __future__ import annotations

import random
import time
from contextlib import contextmanager, nullcontext

import torch

from .budget import NEVER, Deadline
from .config import SleepConfig
from .consolidation import CONTEXT_SYSTEM, subjects
from .memory import MemoryModel
from .probes import Probe, answer_logprob
from .sampling import chat_ids, generate_batch

DREAM_PROMPTS = ["Write a short passage about {s}.", "Tell a short story involving {s}.",
                 "Explain what is special about {s}."]


@contextmanager
def random_expert(memory: MemoryModel, exclude: list[str], rng: random.Random, scale: float = 0.02):
    """Every router additionally takes one random expert at full gate. Before the first sleep
    there is no other expert: a temporary one with random weights plays that part."""
    temp = None
    candidates = [e for e in memory.expert_ids() if e not in exclude]
    if not candidates:
        temp = memory.add_expert(tier=2, born=-1, expert_id="dream-noise")
        with torch.no_grad():
            for e in memory.expert_modules(temp):
                e.B.normal_(std=scale / e.rank ** 0.5)
        candidates = [temp]
    forced = {layer: rng.choice(candidates) for layer in memory.mlps}
    try:
        with memory.configured(forced=forced):
            yield forced
    finally:
        if temp:
            memory.remove_experts([temp])


def dream_loss(lm, tokenizer, prompt_ids: list[int], dream_ids: list[int]) -> torch.Tensor:
    """LM loss of the dream text as the answer to its prompt, without the episodes in context."""
    dev = next(lm.parameters()).device
    ids = torch.tensor([prompt_ids + dream_ids], device=dev)
    labels = ids.clone()
    labels[:, :len(prompt_ids)] = -100
    return lm(input_ids=ids, labels=labels).loss


def grad_score(memory: MemoryModel, tokenizer, prompt_ids, dream_ids, params) -> float:
    """‖∇ L_SFT(dream)‖₂ over the trainable parameters: how much the dream would teach."""
    for p in params:
        p.grad = None
    with memory.configured(fast_weights=False):
        dream_loss(memory.lm, tokenizer, prompt_ids, dream_ids).backward()
    norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None))
    for p in params:
        p.grad = None
    return float(norm)


def sft(memory: MemoryModel, tokenizer, pairs, params, steps: int, lr: float) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for step in range(steps):
        prompt_ids, dream_ids = pairs[step % len(pairs)]
        with memory.configured(fast_weights=False):
            loss = dream_loss(memory.lm, tokenizer, prompt_ids, dream_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@contextmanager
def isolated(params):
    """Run a trial on the real parameters and put every value back afterwards, bit for bit."""
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
                p.grad = None


OUT_OF_TIME = "the sleep's time budget"


class Dreamer:
    def __init__(self, memory: MemoryModel, tokenizer, cfg: SleepConfig, emit, check, seed: int = 0,
                 deadline: Deadline = NEVER):
        self.memory, self.tok, self.cfg, self.emit, self.check = memory, tokenizer, cfg, emit, check
        self.rng = random.Random(seed)
        self.deadline = deadline   # the sleep's learning budget: no round, trial or M-step that would pass it
        self.trial_s = self.step_s = None   # measured: the last trial, one SFT step

    def fits(self, seconds: float | None) -> bool:
        """Whether work that took `seconds` last time (None: not timed yet) still fits the budget."""
        return not self.deadline.passed() and (seconds is None or seconds <= self.deadline.left())

    def metric(self, facts: list[Probe]) -> float:
        """τ: mean closed-book log-likelihood of the episodes' facts."""
        with self.memory.configured(fast_weights=False):
            return answer_logprob(self.memory.lm, self.tok, facts)

    def run(self, episodes, facts: list[Probe], new_ids: list[str]) -> dict:
        cfg = self.cfg
        # each dream sees the one episode its subject comes from (a small model mixes several up)
        topics = [(s, e.text) for e in episodes for s in subjects(e.text) or ["what you read"]]
        stats = {"generated": 0, "kept": 0, "rewarded": 0, "rounds": cfg.rest_rounds}
        # the layers consolidation trained: below them the new experts stay zero and shut
        params = self.memory.train_only(new_ids, from_layer=self.memory.first_trained_layer(cfg.trained_layers))
        try:
            for rnd in range(max(cfg.rest_rounds, 1)):
                self.check()
                if rnd and self.deadline.passed():
                    stats.update(rounds=rnd, cut=OUT_OF_TIME)
                    break
                asks, pairs = self.dream(topics, new_ids)
                stats["generated"] += len(pairs)
                if not pairs:
                    continue
                scores = [grad_score(self.memory, self.tok, p, d, params) for p, d in pairs]
                order = sorted(range(len(pairs)), key=lambda i: -scores[i]) if cfg.grad_selection else \
                    self.rng.sample(range(len(pairs)), len(pairs))
                kept = order[:cfg.keep_top]
                rest = order[cfg.keep_top:]
                kept += self.rng.sample(rest, min(cfg.keep_random, len(rest)))
                rewarded = self.trials(rnd, asks, pairs, scores, kept, facts, params, stats)
                stats["kept"] += len(kept)
                stats["rewarded"] += len(rewarded)
                # M-step: fine-tune the new expert on the rewarded dreams
                if rewarded and cfg.rest_steps:
                    if self.fits(None if self.step_s is None else cfg.rest_steps * self.step_s):
                        sft(self.memory, self.tok, rewarded, params, cfg.rest_steps, cfg.dream_lr)
                    else:
                        stats["cut"] = OUT_OF_TIME
        finally:
            self.memory.freeze_all()
        return stats

    def dream(self, topics, new_ids: list[str]) -> tuple[list[str], list[tuple]]:
        """E-step: dreams conditioned on the episodes, one random expert per router; (asks,
        (prompt ids, dream ids) pairs) for the dreams that are not empty."""
        cfg = self.cfg
        picks = [self.rng.choice(topics) for _ in range(cfg.dreams)]
        asks = [self.rng.choice(DREAM_PROMPTS).format(s=subject) for subject, _ in picks]
        contexts = [chat_ids(self.tok, a, CONTEXT_SYSTEM.format(notes=text)) for a, (_, text) in zip(asks, picks)]
        novelty = random_expert(self.memory, new_ids, self.rng) if cfg.random_expert else nullcontext()
        with torch.no_grad(), novelty:
            dreams = generate_batch(self.memory.lm, self.tok, contexts, cfg.dream_tokens, temperature=1.0,
                                    top_p=0.95, seed=self.rng.randrange(1 << 30))
        asks, dreams = zip(*[(a, d) for a, d in zip(asks, dreams) if d]) if any(dreams) else ((), ())
        return list(asks), [(chat_ids(self.tok, a), d) for a, d in zip(asks, dreams)]

    def trials(self, rnd: int, asks, pairs, scores, kept: list[int], facts, params, stats) -> list:
        """Try each kept dream on an isolated copy of the trainable parameters: reward 1 where τ
        rose. A trial starts only while the last one's time is left (a kept dream not tried is
        dropped from `kept`); the dreams that were rewarded are returned."""
        before = self.metric(facts) if kept and self.fits(self.trial_s) else None   # τ, if a trial can start
        rewarded = []
        for i, (p, d) in enumerate(pairs):
            self.check()
            reward, after = None, None
            if i in kept and not self.fits(self.trial_s):
                kept.remove(i)
                stats["cut"] = OUT_OF_TIME
            if i in kept:
                t0 = time.perf_counter()
                with isolated(params):
                    sft(self.memory, self.tok, [(p, d)], params, self.cfg.trial_steps, self.cfg.dream_lr)
                    self.step_s = (time.perf_counter() - t0) / self.cfg.trial_steps
                    after = self.metric(facts)
                self.trial_s = time.perf_counter() - t0
                reward = 1 if after > before else 0
                if reward:
                    rewarded.append((p, d))
            self.emit("dream", round=rnd + 1, index=i, text=self.tok.decode(d, skip_special_tokens=True),
                      prompt=asks[i], grad_score=round(scores[i], 5), kept=i in kept, reward=reward,
                      metric_before=None if before is None else round(before, 4),
                      metric_after=None if after is None else round(after, 4))
        return rewarded
