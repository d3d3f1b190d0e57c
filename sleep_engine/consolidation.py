"""Sleep phase 1, memory consolidation (docs/DESIGN.md §4): expansion, knowledge seeding, reset.

Teacher = the model before expansion, with fast weights and the episodes in its context.
Student = the expanded model, without fast weights or context; only the new expert trains.
Seeding maximises (1−α)·E[imitation reward] − α·E[generalized JSD(teacher, student)].
"""
from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import SleepConfig
from .losses import generalized_jsd_loss, group_policy_gradient_loss
from .memory import MemoryModel
from .probes import sentences
from .rewards import imitation_rewards
from .sampling import chat_ids, generate_batch

CONTEXT_SYSTEM = "You are a helpful assistant. Use these notes when you answer:\n\n{notes}"
_NAME = re.compile(r"\b[A-Z][a-z]+(?:\s+(?:of\s+|de\s+)?[A-Z][a-z]+)+\b|\b[A-Z][a-z]{3,}\b")
# Generic requests answered by the pre-sleep model without context: the student must keep
# answering them as before, which keeps the new expert from changing unrelated behaviour.
# (Written for this purpose; the perplexity check uses different text, assets/generic_text.txt.)
ANCHOR_PROMPTS = [
    "Give me a tip for sleeping well.", "What is a good way to learn a new language?",
    "Write one sentence about autumn leaves.", "Explain what a thermometer measures.",
    "Name three kinds of fruit.", "How do you make a cup of tea?", "Why do people exercise?",
    "What does a librarian do?", "Describe the colour blue to a child.", "What is the sum of 12 and 7?",
    "Suggest a name for a pet goldfish.", "What are clouds made of?", "How many legs does a spider have?",
    "Write a short greeting for a birthday card.", "What is the opposite of 'ancient'?",
    "Why is the sea salty?",
]
# Plain text (not chat) the student must keep predicting as the pre-sleep model did: the chat
# anchors above do not constrain raw-text behaviour. Disjoint from the drift test text.
ANCHOR_TEXT = Path(__file__).resolve().parents[1] / "assets" / "anchor_text.txt"
_STOP = {"The", "This", "That", "These", "Those", "There", "Their", "When", "Every", "Each", "After", "Before"}


def subjects(text: str, limit: int = 4) -> list[str]:
    """Names the text is about (capitalised word runs), most frequent first."""
    counts: dict[str, int] = {}
    for m in _NAME.finditer(text):
        name = m.group()
        if name.split()[0] in _STOP:
            name = " ".join(name.split()[1:])
        if len(name) > 3:
            counts[name] = counts.get(name, 0) + 1
    return sorted(counts, key=lambda n: (-counts[n], -len(n)))[:limit]


# Recitation first: with the episode in context the teacher mostly copies it faithfully, while
# open questions about a side subject invite invention (measured: "Lake Tessarine is in Madagascar").
SUBJECT_TEMPLATES = ["What do your notes say about {s}?", "Tell me about {s}.", "What is {s} known for?",
                     "Who is connected with {s}?", "When did things happen at or with {s}?",
                     "Give me three facts about {s}.", "Where is {s}, or where did it happen?",
                     "Describe {s} in two sentences.", "What do you know about {s}?"]


def seed_prompts(text: str, n: int) -> list[str]:
    """What the teacher is asked about a new episode: a recitation of the whole note; a quote of
    each later sentence (a recitation is cut at `answer_tokens` and the teacher recites from the
    start whatever it is asked, so without these the last sentence's facts were never taught);
    then generic questions about each subject it names, round-robin over subjects (coverage
    decides what is learned, docs/DESIGN.md §11). The episode's probe questions are deliberately not
    used: they are the test."""
    names = subjects(text)
    if not names:
        return []
    topic = min(names, key=text.find)   # the name met first is what the note is about
    prompts = [f"Repeat your notes about {topic} word for word."]
    prompts += [f'Quote the sentence of your notes about {topic} that begins "{" ".join(s.split()[:3])}".'
                for s in sentences(text)[1:]]
    prompts += [t.format(s=s) for t in SUBJECT_TEMPLATES for s in names]
    return prompts[:n]


def faithfulness(answer: str, source: str) -> float:
    """Share of the names (capitalised words not starting a sentence) and numbers in `answer` that
    also occur in `source`; 0 if it names nothing. A cheap check that the teacher copied rather
    than invented."""
    facts = []
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", answer):
        for i, word in enumerate(sentence.split()):
            word = word.strip(".,;:!?()\"'’")
            if re.fullmatch(r"\d[\d,]*\d", word) or (i > 0 and re.fullmatch(r"[A-Z][a-z]{2,}", word)):
                facts.append(word.lower())
    if not facts:
        return 0.0
    lowered = source.lower()
    return sum(f in lowered for f in facts) / len(facts)


def distill_steps(cfg: SleepConfig, pool_size: int) -> int:
    """Distillation steps of one sleep: `cfg.distill_steps` if set, else `distill_epochs` passes
    over the `pool_size` prompts (episode, replay and chat-anchor answers), so a sleep after four
    episodes trains about as long per episode as a sleep after one."""
    return cfg.distill_steps or max(1, math.ceil(cfg.distill_epochs * pool_size / cfg.batch_size))


@dataclass
class Example:
    student: list[int]     # student prompt + answer
    teacher: list[int]     # teacher prompt (with context for new episodes) + the same answer
    n_answer: int
    prompt: str
    answer_text: str
    teacher_logits: torch.Tensor | None = None   # (n_answer, vocab), kept from the teacher's own generation
    about_episode: bool = True                   # False for self-replay and anchor prompts


def _forward_answer_logits(lm, seqs: list[list[int]], n_answers: list[int], pad: int) -> torch.Tensor:
    """Logits predicting the last n tokens of each sequence, stacked: (Σ n, vocab). The output head
    runs only on those positions."""
    dev = next(lm.parameters()).device
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=dev)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=dev)
    hidden = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    rows = torch.cat([torch.full((n,), r, device=dev) for r, n in enumerate(n_answers)])
    cols = torch.cat([torch.arange(len(s) - n - 1, len(s) - 1, device=dev) for s, n in zip(seqs, n_answers)])
    return lm.lm_head(hidden[rows, cols])


def _answer_targets(seqs, n_answers, device) -> torch.Tensor:
    return torch.tensor([t for s, n in zip(seqs, n_answers) for t in s[len(s) - n:]], device=device)


class Consolidator:
    """Knowledge seeding of one new expert. `emit(kind, **data)` reports; `check()` raises on cancel."""

    def __init__(self, memory: MemoryModel, tokenizer, cfg: SleepConfig, emit, check, seed: int = 0):
        self.memory, self.lm, self.tok, self.cfg = memory, memory.lm, tokenizer, cfg
        self.emit, self.check = emit, check
        self.rng = random.Random(seed)
        self.pad = tokenizer.pad_token_id or 0
        self.student_muted: list[str] = []   # tier consolidation: the student loses the experts it replaces

    # -- data written by the teacher ---------------------------------------------------------
    def teacher_data(self, new_episodes, old_episodes, new_id: str) -> list[Example]:
        """Each prompt about an episode goes to the teacher with that episode alone in context
        (with all of them, a 135M teacher mixes their facts up); answers that name things the
        episode does not contain are dropped (`min_faithfulness`). Self-replay asks the same kind
        of questions about older episodes, answered from memory (no context): the new expert must
        not overwrite what older experts hold. Probe questions are never asked: they are the test."""
        prompts = []   # (question, teacher's system prompt or None, source text to check against)
        for ep in new_episodes:
            system = CONTEXT_SYSTEM.format(notes=ep.text)
            prompts += [(q, system, ep.text) for q in seed_prompts(ep.text, self.cfg.prompts_per_episode)]
        for ep in old_episodes:
            prompts += [(q, None, None) for q in seed_prompts(ep.text, self.cfg.replay_per_episode)]
        prompts += [(q, None, None) for q in self.chat_anchors()]
        teacher_prompts = [chat_ids(self.tok, q, system) for q, system, _ in prompts]
        with self.memory.configured(muted=[new_id], fast_weights=True):
            answers, logits = generate_batch(self.lm, self.tok, teacher_prompts, self.cfg.answer_tokens,
                                             return_logits=True, batch_size=32)
        out, passed, best = [], set(), {}   # best: per episode its most faithful answer, kept if none passes
        for (q, _, source), tp, ans, lg in zip(prompts, teacher_prompts, answers, logits):
            if not ans:
                continue
            text = self.tok.decode(ans, skip_special_tokens=True)
            example = Example(chat_ids(self.tok, q) + ans, tp + ans, len(ans), q, text, lg,
                              about_episode=source is not None)
            score = 1.0 if source is None else faithfulness(text, source)
            if score >= self.cfg.min_faithfulness:
                out.append(example)
                passed.add(source)
            elif score > best.get(source, (-1.0, None))[0]:
                best[source] = (score, example)
        fallbacks = [example for source, (_, example) in best.items() if source not in passed]
        return out + fallbacks + self.text_anchors(new_id)

    def chat_anchors(self) -> list[str]:
        """Generic requests, answered by the pre-sleep model without context."""
        return self.rng.sample(ANCHOR_PROMPTS, min(self.cfg.anchor_prompts, len(ANCHOR_PROMPTS)))

    @torch.no_grad()
    def text_anchors(self, new_id: str, max_tokens: int = 64) -> list[Example]:
        """Paragraphs of everyday text with the pre-sleep model's next-token distributions."""
        paragraphs = [p.strip() for p in ANCHOR_TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        chosen = self.rng.sample(paragraphs, min(self.cfg.anchor_texts, len(paragraphs)))
        if not chosen:
            return []
        seqs = [self.tok(p, add_special_tokens=False)["input_ids"][:max_tokens] for p in chosen]
        lengths = [len(s) - 1 for s in seqs]
        with self.memory.configured(muted=[new_id], fast_weights=False):
            logits = _forward_answer_logits(self.lm, seqs, lengths, self.pad).to(torch.bfloat16)
        return [Example(s, s, n, "", p, lg, about_episode=False)
                for s, n, p, lg in zip(seqs, lengths, chosen, logits.split(lengths))]

    # -- the objective -------------------------------------------------------------------------
    def divergence(self, batch: list[Example], new_id: str) -> torch.Tensor:
        if all(e.teacher_logits is not None for e in batch):
            t_logits = torch.cat([e.teacher_logits for e in batch]).float()
        else:
            with torch.no_grad(), self.memory.configured(muted=[new_id], fast_weights=True):
                t_logits = _forward_answer_logits(self.lm, [e.teacher for e in batch], [e.n_answer for e in batch],
                                                  self.pad)
        with self.memory.configured(muted=self.student_muted, fast_weights=False):
            s_logits = _forward_answer_logits(self.lm, [e.student for e in batch], [e.n_answer for e in batch], self.pad)
        return generalized_jsd_loss(s_logits, t_logits, beta=self.cfg.beta)

    def on_policy(self, batch: list[Example], new_id: str) -> list[Example]:
        """Replace the teacher's answer by the student's own sample in a fraction λ of the batch."""
        chats = [i for i, e in enumerate(batch) if e.prompt]   # plain-text anchors have no prompt to answer
        k = min(round(self.cfg.lmbda * len(batch)), len(chats))
        if k == 0:
            return batch
        chosen = self.rng.sample(chats, k)
        prompts = [batch[i].student[:len(batch[i].student) - batch[i].n_answer] for i in chosen]
        with self.memory.configured(fast_weights=False):
            samples = generate_batch(self.lm, self.tok, prompts, self.cfg.answer_tokens, temperature=0.7,
                                     seed=self.rng.randrange(1 << 30))
        batch = list(batch)
        for i, p, s in zip(chosen, prompts, samples):
            if s:
                e = batch[i]
                t_prompt = e.teacher[:len(e.teacher) - e.n_answer]
                batch[i] = Example(p + s, t_prompt + s, len(s), e.prompt, self.tok.decode(s),
                                   about_episode=e.about_episode)
        return batch

    def imitation(self, examples: list[Example], step: int) -> tuple[torch.Tensor, float]:
        """Learning to Imitate: cut teacher texts at a random point, let the student complete them,
        reward the completions, policy gradient with the group mean as baseline."""
        cfg = self.cfg
        # imitate what the teacher wrote about the episodes, not the anchors or replayed answers
        own = [e for e in examples if e.about_episode] or examples
        long = [e for e in own if e.n_answer >= 12] or own
        picks = [self.rng.choice(long) for _ in range(cfg.lti_prefixes)]
        prompts, refs, meta = [], [], []
        for e in picks:
            answer = e.student[len(e.student) - e.n_answer:]
            cut = self.rng.randint(max(1, int(0.3 * len(answer))), max(1, int(0.7 * len(answer))))
            prompt = e.student[:len(e.student) - e.n_answer] + answer[:cut]
            ref = self.tok.decode(answer[cut:cut + cfg.lti_tokens], skip_special_tokens=True)
            for _ in range(cfg.lti_group):
                prompts.append(prompt)
                refs.append(ref)
            meta.append((self.tok.decode(answer[:cut], skip_special_tokens=True), ref))
        with self.memory.configured(fast_weights=False):
            completions = generate_batch(self.lm, self.tok, prompts, cfg.lti_tokens, temperature=1.0, top_p=0.95,
                                         seed=self.rng.randrange(1 << 30), batch_size=32)
        texts = [self.tok.decode(c, skip_special_tokens=True) for c in completions]
        scores = imitation_rewards(texts, refs, cfg.gamma, cfg.tau_sem, cfg.z0, cfg.semantic_reward)
        for i, (prefix, ref) in enumerate(meta):
            j = i * cfg.lti_group   # report the first completion of each group
            self.emit("sample", step=step + 1, prefix=prefix, teacher=ref, student=texts[j], **scores[j])
        seqs = [p + (c or [self.tok.eos_token_id]) for p, c in zip(prompts, completions)]
        lens = [max(len(c), 1) for c in completions]
        with self.memory.configured(fast_weights=False):
            logits = _forward_answer_logits(self.lm, seqs, lens, self.pad)
        targets = _answer_targets(seqs, lens, logits.device)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
        per_seq = torch.stack([chunk.sum() for chunk in logp.split(lens)])
        rewards = torch.tensor([s["reward"] for s in scores], device=per_seq.device)
        loss = group_policy_gradient_loss(per_seq, rewards, torch.tensor(lens, device=per_seq.device), cfg.lti_group)
        return loss, float(rewards.mean())

    def seed(self, examples: list[Example], new_id: str, phase: str = "consolidation") -> dict:
        """Train the new expert (only) on the teacher's data; returns summary numbers."""
        cfg = self.cfg
        if not examples:   # the teacher wrote nothing usable: nothing to seed, the expert stays zero
            return {"steps": 0, "examples": 0, "final_divergence": None, "first_divergence": None,
                    "mean_reward": None}
        params = self.memory.train_only([new_id])
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        # Every step: a batch of answers (episodes, replay, chat anchors) plus a few plain-text
        # anchors, so the pull to keep everyday text unchanged never skips a step.
        pool = [e for e in examples if e.prompt]
        texts = [e for e in examples if not e.prompt]
        if not pool:
            pool, texts = texts, []
        total = distill_steps(cfg, len(pool)) + (cfg.lti_steps if cfg.lti else 0)
        lti_at = set(range(total - cfg.lti_steps, total)) if cfg.lti else set()
        divergences, rewards = [], []
        per_step = min(cfg.anchor_texts_per_step, len(texts))
        order: list[int] = []
        try:
            for step in range(total):
                self.check()
                t0 = time.perf_counter()
                if len(order) < cfg.batch_size:
                    order += self.rng.sample(range(len(pool)), len(pool))
                batch = [pool[i] for i in order[:cfg.batch_size]]
                del order[:cfg.batch_size]
                if cfg.lmbda > 0:
                    batch = self.on_policy(batch, new_id)
                batch += [texts[(step * per_step + j) % len(texts)] for j in range(per_step)]
                div = self.divergence(batch, new_id)
                loss, reward = div, None
                if step in lti_at:
                    pg, reward = self.imitation(examples, step)
                    loss = cfg.alpha * div + (1 - cfg.alpha) * pg
                    rewards.append(reward)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                divergences.append(float(div.detach()))
                self.emit("loss", phase=phase, step=step + 1, total=total, divergence=divergences[-1],
                          reward=reward, seconds=round(time.perf_counter() - t0, 3))
        finally:
            self.memory.freeze_all()
        return {"steps": total, "examples": len(examples), "final_divergence": divergences[-1] if divergences else None,
                "first_divergence": divergences[0] if divergences else None,
                "mean_reward": sum(rewards) / len(rewards) if rewards else None}
