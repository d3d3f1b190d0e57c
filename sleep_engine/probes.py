"""Probes and forgetting (docs/DESIGN.md §8): closed-book questions per episode, the accuracy matrix
R[i][j] (accuracy on episode j after sleep i), forgetting, backward transfer, general drift."""
from __future__ import annotations

import re
import string
import time
from dataclasses import dataclass

import torch

from .chat_format import encode_text
from .memory import routed_gate
from .sampling import chat_ids, common_prefix, generate_batch, prefix_cache

ANSWER_PROMPT = "Answer directly and concisely. {q}"   # fixed; used by every method and metric


@dataclass
class Probe:
    episode_id: int
    q: str
    a: str


def normalize(text: str) -> str:
    text = text.lower().translate(str.maketrans({c: " " for c in string.punctuation}))
    return " ".join(text.split())


def is_correct(reply: str, gold: str) -> bool:
    """Normalised gold answer appears in the normalised reply, on word boundaries."""
    g = normalize(gold)
    return bool(g) and f" {g} " in f" {normalize(reply)} "


_CANDIDATE = re.compile(r"\b(?:[A-Z][a-z]+(?:\s+[A-Z][a-z]+)*|\d[\d,.]*)\b")


def sentences(text: str) -> list[str]:
    """The text's sentences (split after . ! or ? followed by whitespace)."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


def cloze_probes(episode_id: int, text: str, limit: int = 3) -> list[Probe]:
    """Fill-in-the-blank probes from names and numbers in the text (for episodes without QA).
    The first word of a sentence is skipped: it is capitalised anyway."""
    probes = []
    for sentence in sentences(text):
        for m in _CANDIDATE.finditer(sentence):
            if m.start() == 0 or len(m.group()) < 3:
                continue
            blank = sentence[:m.start()] + "___" + sentence[m.end():]
            probes.append(Probe(episode_id, f"Fill in the blank: {blank}", m.group().rstrip(".,")))
            break
        if len(probes) >= limit:
            break
    return probes


@torch.no_grad()
def shared_prefix_pass(model, seqs: list[list[int]], pad: int, most: int):
    """One forward of `seqs` (right-padded) through `model` (a transformers decoder, with or
    without its LM head) that reads their common prefix, up to `most` tokens, once: the prefix
    runs alone and its keys and values serve every row. Returns (output of the rows' remaining
    tokens, P = the prefix length, their attention mask). Every probe prompt starts with the same
    chat template, system prompt and instruction — 20 of the everyday questions' ~34 tokens —
    and a probe pass costs what its tokens cost (compute-bound on 2 cores)."""
    dev = next(model.parameters()).device
    P = common_prefix(seqs, most)
    width = max(len(s) for s in seqs)
    rest = torch.tensor([s[P:] + [pad] * (width - len(s)) for s in seqs], device=dev)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=dev)
    cache = prefix_cache(model, seqs[0][:P], len(seqs))
    positions = torch.arange(P, width, device=dev)[None].expand(len(seqs), -1)
    out = model(input_ids=rest, attention_mask=mask, position_ids=positions, cache=cache, use_cache=cache is not None)
    return out, P, mask


def episode_probes(episode) -> list[Probe]:
    if episode.qa:
        return [Probe(episode.id, item["q"], item["a"]) for item in episode.qa]
    return cloze_probes(episode.id, episode.text)


@torch.no_grad()
def answer_logprob(lm, tokenizer, probes: list[Probe], batch_size: int = 16) -> float:
    """Mean per-token log-likelihood of the gold answers, closed-book (the dreaming metric τ)."""
    if not probes:
        return 0.0
    total, count = 0.0, 0
    dev = next(lm.parameters()).device
    for i in range(0, len(probes), batch_size):
        chunk = probes[i:i + batch_size]
        seqs, spans = [], []
        for p in chunk:
            prompt = chat_ids(tokenizer, ANSWER_PROMPT.format(q=p.q))
            answer = encode_text(tokenizer, " " + p.a if not p.a.startswith(" ") else p.a)   # a typed <|im_end|> is text
            seqs.append(prompt + answer)
            spans.append(len(answer))
        first = min(len(s) - n for s, n in zip(seqs, spans))   # the first answer token's logit comes from P − 1
        out, P, _ = shared_prefix_pass(lm, seqs, tokenizer.pad_token_id or 0, first - 1)
        logp = torch.log_softmax(out.logits.float(), -1)
        for row, (s, n) in enumerate(zip(seqs, spans)):
            pos = torch.arange(len(s) - n, len(s), device=dev)
            total += float(logp[row, pos - 1 - P, torch.tensor(s, device=dev)[pos]].sum())
            count += n
    return total / max(count, 1)


def closed_book_accuracy(lm, tokenizer, probes: list[Probe], max_new_tokens: int = 24,
                         readings=None) -> dict[int, float]:
    """Accuracy per episode id (greedy reply to the fixed answer prompt, no context); with
    `readings` (readings.Readings) a reply already read in this memory state is not generated again."""
    if not probes:
        return {}
    prompts = [chat_ids(tokenizer, ANSWER_PROMPT.format(q=p.q)) for p in probes]
    replies = (readings.answers(lm, tokenizer, prompts, max_new_tokens) if readings is not None else
               generate_batch(lm, tokenizer, prompts, max_new_tokens, temperature=0.0))
    per: dict[int, list[bool]] = {}
    for p, r in zip(probes, replies):
        per.setdefault(p.episode_id, []).append(is_correct(tokenizer.decode(r, skip_special_tokens=True), p.a))
    return {eid: sum(v) / len(v) for eid, v in per.items()}


@torch.no_grad()
def perplexity(lm, tokenizer, text: str, max_tokens: int = 1024) -> float:
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens].to(next(lm.parameters()).device)
    return float(torch.exp(lm(input_ids=ids, labels=ids).loss))


# -- the accuracy matrix ------------------------------------------------------------------------

def average_accuracy(R: list[list[float]]) -> float:
    """mean_j R[T][j] over the tasks learned so far (row T = last)."""
    return sum(R[-1]) / len(R[-1]) if R and R[-1] else 0.0


def _learned_at(R: list[list[float]]) -> list[int]:
    """Row in which each column first appears (one sleep may consolidate several episodes)."""
    return [next(i for i, row in enumerate(R) if len(row) > j) for j in range(len(R[-1]))]


def backward_transfer(R: list[list[float]]) -> float:
    """mean_j (R[T][j] − R[t_j][j]) over columns learned before the last row (t_j = the row that
    learned j); negative = forgetting. Row i lists the episodes consolidated through sleep i."""
    T = len(R) - 1
    cols = [(j, t) for j, t in enumerate(_learned_at(R))] if R else []
    cols = [(j, t) for j, t in cols if t < T]
    return sum(R[T][j] - R[t][j] for j, t in cols) / len(cols) if cols else 0.0


def forgetting(R: list[list[float]]) -> float:
    """Chaudhry et al.: mean_j (max_{t_j ≤ l < T} R[l][j] − R[T][j]) over columns learned before T."""
    T = len(R) - 1
    cols = [(j, t) for j, t in enumerate(_learned_at(R)) if t < T] if R else []
    return sum(max(R[l][j] for l in range(t, T)) - R[T][j] for j, t in cols) / len(cols) if cols else 0.0


# -- locality of sleep-added experts (issue 13) -------------------------------------------------

@torch.no_grad()
def question_gates(memory, tokenizer, questions: list[str], expert_ids: list[str] | None = None,
                   batch_size: int = 16, deadline=None) -> dict[str, list[float]] | None:
    """Mean gate g = routed_gate(w·x + b) of each routed expert on each question, closed-book in the probes'
    answer prompt: averaged over the question's own tokens (from where the prompts stop sharing
    the template and the fixed instruction, up to the start of the reply) and over layers.
    Returns {expert_id: [one mean gate per question]}, or None when a batch did not fit before
    `deadline` (budget.Deadline): one starts only while the last one's time is left."""
    ids_of = expert_ids or memory.expert_ids()
    out: dict[str, list[float]] = {e: [] for e in ids_of}
    if not questions or not ids_of:
        return out
    a = chat_ids(tokenizer, ANSWER_PROMPT.format(q="a"))
    b = chat_ids(tokenizer, ANSWER_PROMPT.format(q="b"))
    start = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    dev = next(memory.lm.parameters()).device
    pad = tokenizer.pad_token_id or 0
    batch_s = 0.0
    for i in range(0, len(questions), batch_size):
        if deadline is not None and deadline.left() <= batch_s:
            return None
        started = time.perf_counter()
        seqs = [chat_ids(tokenizer, ANSWER_PROMPT.format(q=q)) for q in questions[i:i + batch_size]]
        with memory.configured(fast_weights=False), memory.capturing() as xs:
            _, P, mask = shared_prefix_pass(memory.lm.model, seqs, pad, start)
        own = mask[:, P:].clone()
        own[:, :start - P] = 0
        sums = {e: torch.zeros(len(seqs), device=dev) for e in ids_of}
        for layer, mlp in memory.mlps.items():
            x = xs[layer][-1].float()
            for e in mlp.experts:
                if e.expert_id in sums:
                    g = routed_gate(x @ e.gate.float() + e.gate_bias.float(), mlp.gate_floor)
                    sums[e.expert_id] += (g * own).sum(-1) / own.sum(-1).clamp(min=1)
        for e in ids_of:
            out[e] += (sums[e] / len(memory.mlps)).tolist()
        batch_s = time.perf_counter() - started
    return out


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def gate_selectivity(own: list[float], everyday: list[float], other: list[float] | None = None,
                     target: float = 0.1) -> dict:
    """One expert's locality from its mean gates per question (`question_gates`): on questions
    about its own episodes, on the fixed everyday questions, on other episodes' questions; the
    ratios to `own`; and whether everyday ≤ target × own (the issue's target)."""
    m_own, m_day, m_other = _mean(own), _mean(everyday), _mean(other or [])
    ratio = lambda m: None if m is None or not m_own else m / m_own  # noqa: E731
    return {"own": m_own, "everyday": m_day, "other": m_other, "n_own": len(own), "n_everyday": len(everyday),
            "n_other": len(other or []), "everyday_over_own": ratio(m_day), "other_over_own": ratio(m_other),
            "meets_target": None if ratio(m_day) is None else ratio(m_day) <= target + 1e-9}


_REPLY_NAME = re.compile(r"\b[A-Z][a-zA-Z]{2,}\b|\b\d[\d,]*\d\b")
# capitalised only because they open a sentence: never a name
_OPENERS = {"the", "this", "that", "these", "those", "there", "their", "its", "and", "but", "when", "where", "which",
            "who", "what", "how", "why", "every", "each", "after", "before", "since", "during", "for", "from", "with",
            "his", "her", "they", "she", "you", "yes", "not", "one", "some", "many", "most", "all", "today"}


def passage_names(text: str) -> set[str]:
    """Names and numbers a text teaches: capitalised words (not sentence openers like "The") and
    numbers of two or more digits; lower case."""
    return {w.lower() for w in _REPLY_NAME.findall(text)} - _OPENERS


def interference(answers: list[dict], passages: dict[str, str], common: frozenset[str] = frozenset()) -> dict:
    """How often a wrong answer is a name from another taught passage. `answers`: {"passage",
    "q", "reply", "correct"} per question; `passages`: id → text of every passage taught. A wrong
    reply interferes when it contains a name or number of another passage that is neither in
    its own passage nor in its question, nor in `common` (words that name no single passage,
    e.g. "Mount" or "River" where several passages of the collection have them)."""
    names = {pid: passage_names(text) - common for pid, text in passages.items()}
    wrong, hits = 0, []
    for a in answers:
        if a["correct"] or a["passage"] not in names:
            continue
        wrong += 1
        own = names[a["passage"]] | passage_names(a.get("q", ""))
        said = passage_names(a["reply"]) - own
        sources = {pid: sorted(said & n) for pid, n in names.items() if pid != a["passage"] and said & n}
        if sources:
            hits.append({"passage": a["passage"], "q": a.get("q", ""), "reply": a["reply"], "from": sources})
    return {"wrong": wrong, "from_other_passage": len(hits), "rate": len(hits) / wrong if wrong else None,
            "examples": hits}
