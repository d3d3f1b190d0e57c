"""How every method is scored, with one evaluator for all of them.

Closed-book: the fixed prompt `probes.ANSWER_PROMPT` ("Answer directly and concisely. {q}") as the
only user message, greedy, `answer_tokens` new tokens. In-context adds the question's own passage
above it (IN_CONTEXT_PROMPT). A reply is correct when the normalised gold answer appears in the
normalised reply on word boundaries (`probes.is_correct`). The semantic score is the cosine, under
the frozen MiniLM judge, between the reply and the passage sentence that holds the gold answer (the
fact as the passage states it; a bare answer like "1863" embeds too poorly to compare): its mean,
and the share of replies at or above `semantic_threshold`. It is lenient (a wrong number in the
right sentence still scores high), so the exact score is the headline and this a second view.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..probes import (
    ANSWER_PROMPT,
    average_accuracy,
    backward_transfer,
    forgetting,
    interference,
    is_correct,
    perplexity,
    sentences,
)
from ..sampling import chat_ids, generate_batch
from .data import Passage, common_names

IN_CONTEXT_PROMPT = "{passage}\n\n" + ANSWER_PROMPT


@dataclass(frozen=True)
class Item:
    passage_id: str
    q: str
    a: str
    ref: str = ""      # the passage sentence holding the answer (semantic reference); the answer if none


def answer_sentence(text: str, gold: str) -> str:
    for sentence in sentences(text):
        if is_correct(sentence, gold):
            return sentence
    return gold


def items_of(passages: list[Passage]) -> list[Item]:
    return [Item(p.id, q, a, answer_sentence(p.text, a)) for p in passages for q, a in p.qa]


@torch.no_grad()
def answer(lm, tokenizer, questions: list[str], contexts: list[str] | None = None, max_new_tokens: int = 32) -> list[str]:
    if contexts is None:
        texts = [ANSWER_PROMPT.format(q=q) for q in questions]
    else:
        texts = [IN_CONTEXT_PROMPT.format(passage=c, q=q) for q, c in zip(questions, contexts)]
    prompts = [chat_ids(tokenizer, t) for t in texts]
    out = generate_batch(lm, tokenizer, prompts, max_new_tokens, temperature=0.0)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out]


def semantic_scores(replies: list[str], golds: list[str]) -> list[float]:
    from ..rewards import SemanticJudge
    return [round(s, 4) for s in SemanticJudge.similarities(replies, golds)]


def score(items: list[Item], replies: list[str], semantic: bool = True, threshold: float = 0.6) -> dict:
    """Accuracy (containment), semantic scores, and every reply, per item and per passage."""
    correct = [is_correct(r, it.a) for it, r in zip(items, replies)]
    sims = semantic_scores(replies, [it.ref or it.a for it in items]) if semantic else [None] * len(items)
    per_passage: dict[str, list[bool]] = {}
    for it, c in zip(items, correct):
        per_passage.setdefault(it.passage_id, []).append(c)
    n = max(len(items), 1)
    out = {"accuracy": sum(correct) / n, "correct": sum(correct), "n": len(items),
           "per_passage": {k: sum(v) / len(v) for k, v in per_passage.items()},
           "answers": [{"passage": it.passage_id, "q": it.q, "gold": it.a, "reply": r, "correct": c, "semantic": s}
                       for it, r, c, s in zip(items, replies, correct, sims)]}
    if semantic:
        out["semantic"] = sum(sims) / n
        out["semantic_accuracy"] = sum(s >= threshold for s in sims) / n
    return out


def evaluate(lm, tokenizer, items: list[Item], contexts: dict[str, str] | None = None, max_new_tokens: int = 32,
             semantic: bool = True, threshold: float = 0.6) -> dict:
    ctx = [contexts[it.passage_id] for it in items] if contexts is not None else None
    replies = answer(lm, tokenizer, [it.q for it in items], ctx, max_new_tokens)
    return score(items, replies, semantic, threshold)


def general_ability(lm, tokenizer, text: str, questions: list[tuple[str, str]] | None, max_new_tokens: int = 32) -> dict:
    """Perplexity on the generic text and accuracy on the general questions (closed-book)."""
    out = {"ppl": perplexity(lm, tokenizer, text)}
    if questions:
        replies = answer(lm, tokenizer, [q for q, _ in questions], None, max_new_tokens)
        ok = [is_correct(r, a) for (_, a), r in zip(questions, replies)]
        out.update(general_accuracy=sum(ok) / len(ok), general_correct=sum(ok), general_n=len(ok))
    return out


def drift(before: dict, after: dict) -> dict:
    """General-ability drift: relative perplexity change (fraction) and accuracy change."""
    out = {"ppl_before": before["ppl"], "ppl_after": after["ppl"], "ppl_change": after["ppl"] / before["ppl"] - 1}
    if "general_accuracy" in before and "general_accuracy" in after:
        out.update(general_accuracy_before=before["general_accuracy"], general_accuracy_after=after["general_accuracy"])
    return out


def matrix_metrics(R: list[list[float]], initial: list[float] | None = None) -> dict:
    """R is the full K×K matrix (row i = after learning episode i, column j = episode j, future
    episodes included). Average accuracy, BWT and forgetting use the lower triangle (probes.py);
    forward transfer compares R[j−1][j] with the untrained model's accuracy b_j on episode j."""
    tri = [row[:i + 1] for i, row in enumerate(R)]
    out = {"average_accuracy": average_accuracy(tri), "bwt": backward_transfer(tri), "forgetting": forgetting(tri)}
    if initial is not None and len(R) > 1:
        out["fwt"] = sum(R[j - 1][j] - initial[j] for j in range(1, len(R))) / (len(R) - 1)
    return out


def borrowing(answers: list[dict], passages: list[Passage]) -> dict:
    """`probes.interference` of these answers, names this collection's passages share left out."""
    return interference(answers, {p.id: p.text for p in passages}, common_names())


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n:

        centre ± half = (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)
    """
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Distribution-free interval of a median from its order statistics (the sign test's):

        [x₍ⱼ₎, x₍ₙ₋ⱼ₊₁₎] of the sorted values, j the largest with P(Binomial(n, ½) ≤ j − 1) ≤ (1 − level)/2,
        coverage = 1 − 2·P(Binomial(n, ½) ≤ j − 1)

    Returns (low, high, coverage). Too few values for `level` (n ≤ 5 at 95%): the smallest and the
    largest, with the coverage they do have."""
    x = sorted(values)
    n = len(x)
    if n == 0:
        raise ValueError("median_interval of no values")
    tail, j = 0.0, 0                       # tail = P(B ≤ j − 1)
    while j < n // 2:
        below = tail + math.comb(n, j) / 2 ** n
        if below > (1 - level) / 2:
            break
        tail, j = below, j + 1
    if j == 0:   # not even the extremes reach `level`
        return x[0], x[-1], 1 - 2 / 2 ** n
    return x[j - 1], x[n - j], 1 - 2 * tail
