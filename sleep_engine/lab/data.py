"""The lab's data (assets/): fictional passages with closed-book QA, generic text, general questions.

Every method receives exactly the `Passage.text` strings chosen here (never the QA): the questions
and gold answers are the test, used only by the evaluator.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .. import ASSETS


@dataclass(frozen=True)
class Passage:
    id: str
    split: str
    title: str
    text: str
    qa: tuple[tuple[str, str], ...]   # (question, gold answer)


class DataError(ValueError):
    """An asset file is missing or malformed."""


def _jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}:{n}: not valid JSON") from None
    return out


def load_passages(split: str | None = None, path: Path = ASSETS / "passages.jsonl") -> list[Passage]:
    out = []
    for n, d in enumerate(_jsonl(path), 1):
        try:
            qa = tuple((item["q"], item["a"]) for item in d["qa"])
            p = Passage(d["id"], d["split"], d.get("title", d["id"]), d["text"], qa)
        except (KeyError, TypeError):
            raise DataError(f"{path}:{n}: expected id, split, text and qa [{{q, a}}]") from None
        if not qa:
            raise DataError(f"{path}:{n}: passage {p.id} has no questions")
        if split is None or p.split == split:
            out.append(p)
    if not out:
        raise DataError(f"{path}: no passages in split {split!r}")
    return out


def general_questions(path: Path = ASSETS / "general_questions.jsonl") -> list[tuple[str, str]]:
    try:
        return [(d["q"], d["a"]) for d in _jsonl(path)]
    except (KeyError, TypeError):
        raise DataError(f"{path}: expected {{q, a}} per line") from None


def generic_text(path: Path = ASSETS / "generic_text.txt") -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None


@functools.cache
def common_names() -> frozenset[str]:
    """Capitalised words and numbers that name no single passage: those two or more passages of the
    collection share ("River", "Lake", "Mount"), and those of the generic text and the everyday
    questions. A wrong answer saying one of them borrows nothing from another passage."""
    from ..probes import passage_names   # not at import: probes imports transformers
    counts = collections.Counter(n for p in load_passages() for n in passage_names(p.text))
    everyday = " ".join(f"{q} {a}" for q, a in general_questions())
    return frozenset({n for n, k in counts.items() if k > 1} | passage_names(generic_text() + " " + everyday))


def fingerprint(passages: list[Passage]) -> str:
    """Hash of the texts and QA a run used; stored with every result so mixed data is caught."""
    blob = json.dumps([[p.id, p.text, p.qa] for p in passages], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
