"""A sleep's time budget (`SleepConfig.budget_s`): a preset promises how long a sleep takes, wall to
wall, so the teacher's writing and the training steps are sized, as the sleep runs, to what is
left once the probes after are set aside (docs/DESIGN.md §4)."""
from __future__ import annotations

import math
import time


class Deadline:
    """A moment on `time.perf_counter()`'s clock, or never (no budget)."""

    def __init__(self, at: float | None = None):
        self.at = at

    @classmethod
    def after(cls, seconds: float | None) -> "Deadline":
        return cls(time.perf_counter() + seconds if seconds is not None else None)

    def left(self) -> float:
        return math.inf if self.at is None else self.at - time.perf_counter()

    def passed(self) -> bool:
        return self.left() <= 0

    def earlier(self, seconds: float) -> "Deadline":
        return Deadline(None if self.at is None else self.at - seconds)


NEVER = Deadline()
WRITING_SHARE = 0.35   # of a part's time, the teacher's answers (split_budget); the rest trains
# kept for the probes after before a sleep has timed them: a share of the budget, at most
# AFTER_MAX_S, or AFTER_PER_BEFORE × what the probes before took in this sleep where that is more
# (a slow hour), at most AFTER_MAX_SHARE of the budget. Measured, quick preset, 2 cores (2026-12-05):
# probes after 10 s over two passages, 15–16 s over ten episodes on a fast hour, 21.9 s at one
# thread (as a slow hour): 1.8–2.4 × the probes before over ten episodes (3.5 × over two, whose
# probes before read cached readings: 2.8 s, under the share). With 15% (13.5 s) a ten-episode
# sleep took 93.0 s, with 20% 82.0 s; at one thread 95.3 s with 20% (18 s); 15% of full's 360 s
# left 40 s unused
AFTER_SHARE, AFTER_MAX_S, AFTER_PER_BEFORE, AFTER_MAX_SHARE = 0.2, 30.0, 2.5, 0.5


def after_reserve(budget_s: float, last_s: float | None, before_s: float | None = None) -> float:
    """Seconds kept at the end of a sleep's budget for the probes after and the checkpoint:

        reserve = 1.2 · t_last              what they took in the last sleep of this state dir
        reserve = max(min(AFTER_SHARE · budget_s, AFTER_MAX_S),
                      min(AFTER_PER_BEFORE · t_before, AFTER_MAX_SHARE · budget_s))
                                            before any sleep timed them (t_before: this sleep's
                                            probes before, once they ran; 0 until then)

    They grow slowly with the sleeps (15.5, 16.2, 16.7 s over make user-check's three quick sleeps,
    2026-12-05): most of them (perplexity, everyday answers, gate selectivity) does not grow with
    the episodes; scaled by the closed-book probes as well, the reserve left 7–11 s unused."""
    if last_s is not None:
        return 1.2 * last_s
    share = min(AFTER_SHARE * budget_s, AFTER_MAX_S)
    return max(share, min(AFTER_PER_BEFORE * (before_s or 0.0), AFTER_MAX_SHARE * budget_s))


def after_seconds(phases: dict) -> float | None:
    """What a sleep's probes after and checkpoint took, from its phase timings (None where it
    did not time them). A committed sleep's manifest keeps its phases without the checkpoint,
    which is timed after the commit: ~1 s, inside after_reserve's margin."""
    if not isinstance(phases, dict) or "probe_after" not in phases:
        return None   # cut or failed before them: the first sleep's rule then
    times = [phases["probe_after"], phases.get("checkpoint", 0.0)]
    if not all(isinstance(t, (int, float)) and 0 <= t < math.inf for t in times):
        return None   # a hand-edited manifest is not trusted
    return float(sum(times))


def split_budget(left_s: float, dreaming: bool, tier_step: bool) -> dict[str, float]:
    """Seconds for each part of a sleep's learning, when a part starts with `left_s` left of the
    learning budget (the probes before and after are evaluation and safety readings, on top):

        reserve  = 2 + (0.12·left_s if dreaming next)      the phases after this part
        avail    = max(0, left_s − reserve)
        tier     = avail / 2 if a tier step is due, else 0  tier 2 → tier 3 (every F sleeps)
        writing  = 0.35·(avail − tier)                      the teacher's answers
        training = avail − tier − writing                   the distillation steps

    Shares measured on the quick preset, 2 cores (README "Sleep presets are time budgets")."""
    if not math.isfinite(left_s):
        return {"reserve": 0.0, "writing": math.inf, "training": math.inf, "tier": math.inf if tier_step else 0.0}
    reserve = 2.0 + (0.12 * left_s if dreaming else 0.0)
    avail = max(0.0, left_s - reserve)
    tier = avail / 2 if tier_step else 0.0
    writing = WRITING_SHARE * (avail - tier)
    return {"reserve": reserve, "writing": writing, "training": avail - tier - writing, "tier": tier}


def steps_that_fit(done: int, planned: int, step_seconds: list[float], left_s: float) -> int:
    """Total steps once `done` ran: the plan, or fewer when the median step time says the rest
    would not fit in `left_s` seconds; at least `done` (and 1)."""
    if not step_seconds or not math.isfinite(left_s):
        return planned
    per = median(step_seconds)
    return max(done, 1, min(planned, done + int(max(0.0, left_s) // max(per, 1e-6))))


def tier_step_seconds(steps: int, step_seconds: list[float]) -> float | None:
    """Seconds a tier step of `steps` distillation steps needs: the median step time this sleep
    measured × steps, plus the teacher's writing at its usual share,

        need = steps · median(step_seconds) / (1 − WRITING_SHARE)

    None before any step was timed (then nothing can be said and the step is tried)."""
    return steps * median(step_seconds) / (1 - WRITING_SHARE) if step_seconds else None


def median(xs: list[float]) -> float:
    """The upper median (the element at n // 2 of the sorted list)."""
    return sorted(xs)[len(xs) // 2]
