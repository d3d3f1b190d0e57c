"""SleepEngine: owns the model, its memory tiers and the state directory.

Everything the UI or the CLI does goes through here. (Sleep itself — consolidation and
dreaming in a background worker — is built on this object; see docs/DESIGN.md §4–6.)
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from . import ASSETS
from .backbone import Backbone, float_weights, load_backbone
from .budget import NEVER, Deadline, after_reserve, after_seconds, median, split_budget, tier_step_seconds
from .config import ConfigError, LabConfig, SleepConfig
from .consolidation import Consolidator, distill_steps, episode_groups, teacher_prompt_count
from .dreaming import Dreamer
from .events import EventBus
from .export import ExportError, export_memory_config, read_export, read_export_memory
from .lab.data import general_questions
from .memory import MemoryModel
from .probes import (answer_logprob, average_accuracy, backward_transfer, closed_book_accuracy,
                     cloze_probes, episode_probes, forgetting, gate_selectivity, perplexity, question_gates)
from .readings import Readings, digest, readings_file
from .sampling import cancel_points, chat_ids, generate_batch
from .store import StateDir, StateError
from .wake import DEFAULT_SESSION, WakeSession

GENERIC_TEXT = ASSETS / "generic_text.txt"


def everyday_change(before, after) -> dict:
    """What a sleep did to everyday chat: the share of the pre-sleep answers' greedy tokens it
    changed, and exp(ΔCE) − 1 of those answers (+0.05 = 5% less likely), both with tier 1 off."""
    changed = float((after.choices != before.choices).float().mean()) if before.choices.numel() else 0.0
    return {"everyday_changed": changed, "everyday_drift": math.exp(after.chat_ce - before.chat_ce) - 1}


class Cancelled(Exception):
    pass


class NothingToConsolidate(RuntimeError):
    pass

log = logging.getLogger(__name__)


class StateMismatchError(RuntimeError):
    """The state directory was written for another model or memory layout."""


class NumericalFault(RuntimeError):
    """A NaN/inf loss or weight, or an exploding gradient, during a sleep (it is rolled back)."""

    def __init__(self, phase: str, step, what: str):
        super().__init__(f"numerical fault in {phase}" + (f" at step {step}" if step is not None else "") + f": {what}; "
                         "the sleep was stopped and the memory restored to its pre-sleep state")
        self.phase, self.step = phase, step


class SleepRefused(RuntimeError):
    """The sleep finished but failed the sanity gate: it is not committed."""


def same_model(saved, current: str) -> bool:
    """Whether a state dir's recorded model is this one (a local path counts the same however named)."""
    if saved in (None, current):
        return True
    try:
        return Path(str(saved)).expanduser().resolve() == Path(current).expanduser().resolve() and (
            Path(current).expanduser().is_dir())
    except (OSError, RuntimeError):
        return False


def probed_episodes(pending, older, chat_turns: int, seed: int) -> set[int]:
    """The episodes whose probes a sleep reads before and after it: every taught episode, and at
    most `chat_turns` chat turns — this sleep's first, then older ones, each sampled with `seed`
    (a sleep's own seed: a different sample each sleep, so every turn comes round again). Why not
    all: a sleep re-read every turn of the history, 136–161 s per sleep after a 40-turn chat on a
    slow 2-core VM, and a chat turn's cloze probes say little that the taught ones do not."""
    rng = random.Random(seed)
    new_turns = [e.id for e in pending if e.kind != "taught"]
    old_turns = [e.id for e in older if e.kind != "taught"]
    picked = rng.sample(new_turns, min(chat_turns, len(new_turns)))
    picked += rng.sample(old_turns, min(chat_turns - len(picked), len(old_turns)))
    return {e.id for e in [*older, *pending] if e.kind == "taught"} | set(picked)


def configure_torch(cfg: LabConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # tiny denormal floats made a CPU run ~9x slower in the pilot (docs/DESIGN.md §11)
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)


def seconds_left(weights: dict[str, float], phases: dict[str, float], step_seconds: list[float], steps_left: int,
                 in_phase_s: float) -> float | None:
    """Time left of a sleep from what it measured, or None while there is nothing to go on.

        distilling:   left = n_left·t̃ + (t_c + n_left·t̃)·r        t̃ = median step time so far
        after it:     left = max(0, T_c·r − t_after)               T_c = consolidation's seconds
        r = (w_dreaming + w_probe_after + w_checkpoint) / w_consolidation   (phase shares, WEIGHTS)

    t_c: seconds spent in consolidation so far; t_after: seconds since it ended. Before the first
    distillation step (probes, teacher answers) nothing says how long the steps will take: None.
    """
    r = sum(weights.get(k, 0.0) for k in ("dreaming", "probe_after", "checkpoint")) / weights["consolidation"]
    if "consolidation" in phases:
        return max(0.0, phases["consolidation"] * r - in_phase_s)
    if not step_seconds:
        return None
    per = median(step_seconds)
    return steps_left * per + (in_phase_s + steps_left * per) * r


def budget_cut_note(seeded: dict, budget_s: float) -> str | None:
    """What to tell a user whose sleep ran under half its planned steps: its learning is thin, and
    why (on a slow or busy machine the teacher's writing and the gate fit take most of a quick
    sleep's budget: 1 of 18 steps measured, stop 37)."""
    steps, planned = seeded.get("steps", 0), seeded.get("planned_steps", 0)
    if not budget_s or not planned or 2 * steps >= planned:
        return None
    return (f"the {budget_s:g} s budget fit {steps} of {planned} consolidation steps (teacher's writing "
            f"{seeded.get('writing_s', 0):.0f} s, gate fit {seeded.get('gate_s', 0):.0f} s): this sleep learned "
            f"little; the machine is slower than the preset assumes — the full preset or a longer "
            f"budget_s gives the steps time")


def slow_experts(tier_step: dict | None, consolidated: list[int]) -> dict[str, list[int]]:
    """The slow experts a tier step made → the episodes each holds. A manifest from before
    `tier_experts` names one "expert", which held every episode consolidated so far."""
    step = tier_step or {}
    if step.get("experts"):
        return {eid: list(ids) for eid, ids in step["experts"].items()}
    return {step["expert"]: list(consolidated)} if step.get("expert") else {}


# a tier step keeps at least these anchors whatever the preset: its experts' gates are fitted on the
# merged episodes only, and one tier step without anchors moved everyday text by +25% perplexity
TIER_ANCHORS = {"anchor_prompts": 12, "anchor_texts_per_step": 2}
COMMIT_S = 0.5   # kept at a budget's end for the checkpoint and commit (0.09–0.19 s measured, quick, 2 cores)


def tier_settings(cfg: SleepConfig) -> SleepConfig:
    """A tier step's settings: the sleep's, without imitation and with at least TIER_ANCHORS."""
    return SleepConfig(**{**vars(cfg), "lti": False, **{k: max(getattr(cfg, k), v) for k, v in TIER_ANCHORS.items()}})


class SleepRun:
    """One sleep's bookkeeping: its events, progress and time left, phase timings, the numerical
    guard and cancellation. Each phase runs as `with run.phase(name): ...`."""
    # share of a sleep's time per phase, for progress and time left (measured, quick and full
    # presets on 2 CPU cores: consolidation 70–75%, dreaming 10–17%, probes 4–10% each)
    WEIGHTS = {"probe_before": 0.06, "consolidation": 0.72, "dreaming": 0.14, "probe_after": 0.06, "checkpoint": 0.02}

    def __init__(self, engine: "SleepEngine", number: int, cfg: SleepConfig):
        self.engine, self.number, self.cfg = engine, number, cfg
        weights = dict(self.WEIGHTS, dreaming=self.WEIGHTS["dreaming"] if cfg.dreaming else 0.0)
        self.weights = {k: v / sum(weights.values()) for k, v in weights.items()}
        self.done = 0.0                       # share of the sleep finished (phases done)
        self.phases: dict[str, float] = {}    # seconds per finished phase
        self.tier_step = False                # a tier 2 → tier 3 step runs after the reset (_plan_tier_step)
        self.committed = False                # past the commit point: nothing is rolled back
        self.step_seconds: list[float] = []   # consolidation's measured step times (for time left)
        self.steps_left = 0
        self.mark = time.perf_counter()       # when consolidation started, then when it ended
        self.end = NEVER                      # the end of the sleep's time budget (start_clock)
        self.deadline = NEVER                 # the end of its learning: the probes after fit in what is left

    def start_clock(self, after_s: float) -> None:
        """The budget's clock starts once the sleep holds the model; `after_s` seconds at its end
        are kept for the probes after and the checkpoint (budget.after_reserve)."""
        if self.cfg.budget_s:
            self.end = Deadline.after(self.cfg.budget_s)
            self.keep_for_after(after_s)

    def keep_for_after(self, after_s: float) -> None:
        """Learning ends `after_s` seconds before the end of the budget."""
        if self.end.at is not None:
            self.deadline = Deadline(self.end.at - after_s)

    def deadlines(self, dreaming_next: bool, tier_step: bool) -> tuple[Deadline, Deadline]:
        """(writing, training) deadlines for the teacher's answers and the steps of the part about
        to start, from the learning time left and what the later parts need (budget.split_budget)."""
        if self.deadline.at is None:
            return NEVER, NEVER
        share = split_budget(self.deadline.left(), dreaming_next, tier_step)
        return Deadline.after(share["writing"]), Deadline.after(share["writing"] + share["training"])

    def seconds_left(self) -> float | None:
        """From the measured steps; with a time budget, never past its end."""
        guess = seconds_left(self.weights, self.phases, self.step_seconds, self.steps_left,
                             time.perf_counter() - self.mark)
        if self.end.at is None or "probe_after" in self.phases:
            return guess
        left = max(0.0, self.end.left())
        return left if guess is None else min(guess, left)

    def memory_params(self):
        return [p for mlp in self.engine.memory.mlps.values() for n, p in mlp.named_parameters()
                if not n.startswith("base.")]

    def guard(self, where: str, step=None) -> None:
        """NaN/inf in any memory weight stops the sleep (after every phase, before the commit)."""
        if not all(bool(torch.isfinite(p).all()) for p in self.memory_params()):
            raise NumericalFault(where, step, "a memory weight is NaN or infinite")

    def check(self) -> None:
        if self.engine._cancel.is_set():
            raise Cancelled()

    def emit(self, kind: str, **data) -> None:
        """Publish an event; a training step's report also moves the progress and is checked for a
        non-finite number or an exploding gradient."""
        status = self.engine._status
        self.engine.events.emit(kind, self.number, **data)
        if kind == "loss" and data.get("total") and data.get("phase") == "consolidation":
            status["progress"] = self.done + self.weights["consolidation"] * data["step"] / data["total"]
            status["step"] = f"{data['step']}/{data['total']}"
            self.step_seconds.append(data.get("seconds") or 0.0)
            self.steps_left = data["total"] - data["step"]
        if kind in ("loss", "dream"):
            where, step = data.get("phase") or status.get("phase", "?"), data.get("step", data.get("index"))
            bad = [k for k, v in data.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                raise NumericalFault(where, step, f"{bad[0]} is {data[bad[0]]}")
            grads = [p.grad.detach().float() for p in self.memory_params() if p.grad is not None]
            if grads:
                norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
                if not math.isfinite(norm) or norm > self.cfg.max_grad_norm:
                    raise NumericalFault(where, step, f"gradient norm {norm:.3g} (max_grad_norm {self.cfg.max_grad_norm:g})")

    @contextmanager
    def phase(self, name: str):
        """Run one phase: cancel point, status and event before; guard, timing and progress after."""
        self.check()
        self.engine._status.update(phase=name, step=None)
        self.emit("phase", name=name)
        t0 = time.perf_counter()
        if name == "consolidation":
            self.mark = t0
        yield
        self.guard(name)
        self.phases[name] = round(time.perf_counter() - t0, 2)
        if name == "consolidation":
            self.mark = time.perf_counter()
        self.done += self.weights.get(name, 0)
        self.engine._status["progress"] = self.done
        self.emit("timing", phase=name, seconds=self.phases[name])


class SleepEngine:
    def __init__(self, cfg: LabConfig, backbone: Backbone | None = None):
        self.cfg = cfg.validate()
        configure_torch(cfg)
        t0 = time.perf_counter()
        self.state = StateDir(cfg.state_dir)   # takes the state dir's writer lock first (StateLocked if taken)
        try:
            self.backbone = backbone or load_backbone(cfg)
        except BaseException:
            self.state.close()
            raise
        self.tokenizer = self.backbone.tokenizer
        self.export = self._read_export()
        if self.export is not None:   # an export brings its own memory layout (docs/export.md)
            cfg.memory = export_memory_config(self.export)
        self.memory = MemoryModel(self.backbone.model, cfg.memory)
        self.memory.readings = Readings(self.memory, *readings_file(self.backbone, cfg))
        self.lock = threading.RLock()   # one generation or memory change at a time
        self.events = EventBus()
        self._worker: threading.Thread | None = None
        self._cancel = threading.Event()
        self._status: dict = {"state": "awake"}
        self._snapshot: MemoryModel | None = None   # the pre-sleep memory, while a sleep runs
        self._run: SleepRun | None = None             # the running sleep's bookkeeping (time left)
        self._step_seconds: list[float] = []          # the last sleep's step times (is a tier step worth planning?)
        self._after_timed: float | None = None        # its probes after and checkpoint, seconds (_restore)
        try:
            self._restore()
        except BaseException:
            self.state.close()
            raise
        self.wake = WakeSession(self.memory, self.tokenizer, self.state.episodes, cfg.wake,
                                self.lock, on_memory_change=self.save_memory, asleep=self.asleep_snapshot)
        self.ready_s = time.perf_counter() - t0

    def _restore(self) -> None:
        head = self.state.head()   # a restarted app budgets its first sleep with the last one's timing
        self._after_timed = after_seconds(head.manifest.get("phases", {})) if head else None
        try:
            saved = self.state.load_state()
        except StateError as e:
            raise StateMismatchError(str(e)) from None
        if saved is None and self.export is not None:
            saved = self._seed_from_export()
        if saved is None:
            return
        tensors, manifest = saved
        if not same_model(manifest.get("model"), self.backbone.name):
            raise StateMismatchError(
                f"state dir {self.cfg.state_dir} holds memory for model {manifest['model']!r}, not "
                f"{self.backbone.name!r}; use another --state-dir")
        try:
            self.memory.load_memory_state(tensors, manifest)
        except (KeyError, RuntimeError) as e:
            raise StateMismatchError(f"state dir {self.cfg.state_dir} does not fit this model's memory "
                                     f"layout ({str(e).splitlines()[0][:200]}); use another --state-dir") from None

    def _read_export(self) -> dict | None:
        source = self.backbone.source
        if not source or not Path(source).is_dir():
            return None
        try:
            return read_export(source)
        except ExportError as e:
            self.state.close()
            raise StateMismatchError(str(e)) from None

    def _seed_from_export(self):
        """A new state dir on an export starts from the export's memory (saved at once as the
        state dir's own), so nothing the exported model learned is lost."""
        try:
            tensors, manifest = read_export_memory(self.backbone.source)
        except ExportError as e:
            raise StateMismatchError(str(e)) from None
        self.state.save_memory(tensors, dict(manifest, model=self.backbone.name))
        self.state.notices.append(f"memory loaded from the export {self.backbone.source}: "
                                  f"{len(manifest['experts'])} expert(s)")
        return tensors, dict(manifest, model=self.backbone.name)

    def notices(self) -> list[str]:
        """What was set aside when the state dir was opened (torn lines, bad sleeps), for the user."""
        return list(self.state.notices)

    def close(self) -> None:
        """Stop a running sleep (rolled back), let a fast-weight update finish (it saves itself),
        and release the state dir's writer lock."""
        self.cancel()
        if hasattr(self, "wake"):
            self.wake.wait_for_learning()
        self.state.close()

    def undo_sleep(self) -> dict:
        """Undo the last committed sleep: its experts go, the memory is the one it started from
        (bit for bit), and its episodes are pending again. Refused while a sleep runs."""
        self.wake.wait_for_learning()
        with self.lock:
            if self._worker is not None and self._worker.is_alive():
                raise RuntimeError("a sleep is running; stop it first")
            try:
                number, (tensors, manifest) = self.state.undo_last_sleep()
            except StateError as e:
                raise RuntimeError(str(e)) from None
            self.memory.load_memory_state(tensors, manifest)
            self._status = {"state": "awake", "undone": number}
            return {"undone": number, "sleeps": self.state.sleep_count(),
                    "pending": [e.id for e in self.pending_episodes()], "experts": self.memory.expert_ids()}

    def save_memory(self) -> None:
        with self.lock:
            tensors, manifest = self.memory.memory_state()
            manifest["model"] = self.backbone.name
            self.state.save_memory(tensors, manifest)

    def set_fast_learning(self, every) -> None:
        """Wake's test-time learning: update tier 1 every `every` turns (and per taught text); 0 = off."""
        if every is None or float(every) != int(float(every)):
            raise ConfigError(f"test-time learning: give a whole number of turns (0 = off), got {every!r}")
        wake = dataclasses.replace(self.cfg.wake, fast_update_every=int(float(every)))
        wake.validate()
        self.cfg.wake.fast_update_every = wake.fast_update_every   # the Wake session shares this config
        if not wake.fast_update_every:
            self.wake.pending_for_fast_update = []

    # -- read-only views for the UI and the CLI ---------------------------------------------
    def info(self) -> dict:
        b = self.backbone
        return {"model": b.name, "device": str(b.device), "quantize": b.quantize,
                "params": self.memory.parameter_counts(), "layers_with_memory": len(self.memory.mlps),
                "episodes": len(self.state.episodes), "state_dir": str(self.cfg.state_dir),
                "threads": torch.get_num_threads(), "pid": os.getpid()}

    def memory_tiers(self, session: str = DEFAULT_SESSION) -> list[dict]:
        """One row per tier: 0 context (of `session`'s conversation), 1 fast weights, 2.. routed experts."""
        last = self.memory.fast_weight_time   # survives a restart, unlike wake.last_fast_update
        rows = [{"tier": 0, "name": "context", "tokens": self.wake.context_tokens(session),
                 "limit": self.cfg.wake.context_tokens},
                {"tier": 1, "name": "fast weights", "norm": self.memory.fast_weight_norm(),
                 "steps": self.memory.fast_weight_steps, "drift": self.memory.fast_weight_drift,
                 "learning": "off" if not self.cfg.wake.fast_update_every else
                             f"every {self.cfg.wake.fast_update_every} turns and every taught text",
                 "age_s": None if last is None else time.time() - last,
                 "params": self.memory.parameter_counts()["fast_weights"]}]
        for tier, experts in self.memory.experts_by_tier().items():
            rows.append({"tier": tier, "name": f"experts (tier {tier})", "experts": len(experts),
                         "params": sum(e.params for e in experts), "ids": [e.expert_id for e in experts]})
        return rows

    # -- Sleep ------------------------------------------------------------------------------
    def asleep_notice(self) -> str | None:
        st = self._status
        if st.get("state") != "sleeping":
            return None
        return f"The model is asleep ({st.get('phase', '')}, {100 * st.get('progress', 0):.0f}%)."

    def asleep_snapshot(self) -> MemoryModel | None:
        """While a sleep runs: the memory as it was before it (Wake answers from it), else None."""
        return self._snapshot if self._status.get("state") == "sleeping" else None

    def pending_episodes(self):
        """What the next sleep consolidates: the episodes after the last sleep's, less those left out."""
        log = self.state.episodes
        return [e for e in log.since(self.state.consolidated_through()) if e.id not in log.excluded]

    def before_after(self, number: int, question: str, max_new_tokens: int = 64) -> dict:
        """The same question answered by the memory from just before sleep `number` and just
        after it (its checkpoint; fast weights off), greedy, on a twin: the live model is untouched."""
        from .wake import clean_text
        question, _ = clean_text(question, "question", self.cfg.wake.max_message_chars)
        try:
            memories = self.state.sleep_memories(int(number))
        except StateError as e:
            raise ValueError(str(e)) from None
        twin = self.memory.twin()
        prompt = [chat_ids(self.tokenizer, question, self.cfg.wake.system_prompt or None)]
        out = {"sleep": int(number), "question": question}
        for name, (tensors, manifest) in zip(("before", "after"), memories):
            twin.load_memory_state(tensors, manifest)
            with twin.configured(fast_weights=False):
                ids = generate_batch(twin.lm, self.tokenizer, prompt, max_new_tokens)[0]
            out[name] = self.tokenizer.decode(ids, skip_special_tokens=True)
            out[f"{name}_experts"] = [e["expert_id"] for e in manifest["experts"]]
        return out

    # -- the episodes, reviewed before a sleep ------------------------------------------------
    def episode_rows(self) -> list[dict]:
        """Every episode with what became of it: consolidated by sleep N, pending, left out."""
        by_sleep = {i: m.get("sleep") for m in self.state.sleep_manifests() for i in m.get("episode_ids", [])}
        through, log = self.state.consolidated_through(), self.state.episodes
        rows = []
        for e in log.all():
            if e.id in by_sleep:
                status = f"consolidated by sleep {by_sleep[e.id]}"
            elif e.id in log.excluded:
                status = "left out" + (" (passed over by a sleep)" if e.id <= through else " of the next sleep")
            else:
                status = "pending" if e.id > through else "passed over"
            rows.append({"id": e.id, "kind": e.kind, "source": e.source or ("chat" if e.kind == "turn" else "pasted"),
                         "chars": len(e.text), "time": e.time, "status": status,
                         "preview": " ".join(e.text.split())[:80]})
        return rows

    def _reviewable(self, ids) -> list[int]:
        """The ids given, if each names an episode no sleep has consolidated yet (else ValueError)."""
        if self.asleep_notice():
            raise RuntimeError("a sleep is running: change the episodes after it ends")
        known = {e.id for e in self.state.episodes.all()}
        through = self.state.consolidated_through()
        ids = sorted(set(ids))
        bad = [i for i in ids if i not in known or i <= through]
        if bad or not ids:
            raise ValueError(f"no pending episode {', '.join(map(str, bad))}" if bad else "no episode named")
        return ids

    def exclude_episodes(self, ids, excluded: bool = True) -> list[int]:
        """Leave pending episodes out of the next sleeps (or take them back in)."""
        with self.lock:
            ids = self._reviewable(ids)
            self.state.episodes.set_excluded(ids, excluded)
            return ids

    def delete_episodes(self, ids) -> list[int]:
        """Delete pending episodes from the log for good (their text is gone from the state dir)."""
        with self.lock:
            ids = self._reviewable(ids)
            self.state.episodes.delete(ids)
            return ids

    def sleep(self, settings: SleepConfig | None = None, wait: bool = False) -> int:
        """Start a Sleep in a background worker; returns its number at once (or when done, with
        wait=True). Raises NothingToConsolidate if there is no new episode."""
        settings = (settings or self.cfg.sleep).validate()
        self.wake.wait_for_learning()   # what tier 1 was learning belongs to the pre-sleep memory
        with self.lock:
            if self._worker is not None and self._worker.is_alive():
                raise RuntimeError("a sleep is already running")
            pending = self.pending_episodes()
            if not pending:
                raise NothingToConsolidate("nothing to consolidate: teach or chat first (no new episodes)")
            number = self.state.sleep_count() + 1
            self._cancel.clear()
            self._snapshot = self.memory.twin()   # made before the worker changes anything
            self._status = {"state": "sleeping", "sleep": number, "phase": "starting", "progress": 0.0,
                            "episodes": [e.id for e in pending],
                            "started": time.time(), "events": 0}
            self.events.start(self.state.running_dir(number) / "events.jsonl")
            self._worker = threading.Thread(target=self._sleep_worker, args=(number, pending, settings),
                                            name=f"sleep-{number}", daemon=True)
            self._worker.start()
        if wait:
            self._worker.join()
        return number

    def cancel(self) -> bool:
        """Stop the running sleep; the model returns exactly to its pre-sleep state."""
        if self._worker is None or not self._worker.is_alive():
            return False
        self._cancel.set()
        self._worker.join()
        return True

    def status(self) -> dict:
        st = dict(self._status)
        st["events"] = len(self.events.since(0)) if st.get("state") == "sleeping" else st.get("events", 0)
        run = self._run
        if st.get("state") == "sleeping" and run is not None:
            left = run.seconds_left()   # None until the first distillation step says how long steps take
            st["eta_s"] = None if left is None else round(left, 1)
        st["sleeps"] = self.state.sleep_count()
        return st

    def subscribe(self):
        return self.events.subscribe()

    def accuracy_matrix(self) -> dict:
        """R[i][j] over completed sleeps: rows = sleeps, columns = consolidated episodes whose
        probes were read."""
        manifests = self.state.sleep_manifests()
        cols: list[int] = []
        rows, last = [], {}
        for m in manifests:
            row_acc = {int(k): v for k, v in m.get("probe_after", {}).items()}
            # an episode enters at the first sleep that read its probes; a sleep that did not
            # re-read it (`probed_episodes`: chat turns are sampled) carries its last reading
            cols += [e for e in row_acc if e not in cols]
            last.update(row_acc)
            rows.append([last[e] for e in cols])
        return {"episodes": cols, "R": rows, "average_accuracy": average_accuracy(rows) if rows else None,
                "forgetting": forgetting(rows) if rows else None, "bwt": backward_transfer(rows) if rows else None}

    def expert_episodes(self) -> dict[str, list[int]]:
        """The episodes each routed expert was trained on, from the completed sleeps' manifests:
        a tier-2 expert its sleep's episodes, a slow expert those of its group (`slow_experts`);
        the tier-2 experts a tier step removed are gone."""
        out: dict[str, list[int]] = {}
        seen: list[int] = []
        for m in self.state.sleep_manifests():
            seen += [e for e in m.get("episode_ids", []) if e not in seen]
            held = m.get("expert_episodes") or {eid: m.get("episode_ids", []) for eid in m.get("experts_added", [])}
            for eid in m.get("experts_added", []):
                out.setdefault(eid, []).extend(held.get(eid, []))
            step = m.get("tier_consolidation") or {}
            for eid in step.get("removed", []):   # (a deferred step removed nothing)
                out.pop(eid, None)
            out.update(slow_experts(step, seen))
        return out

    def gate_selectivity(self, current: dict[str, list[int]] | None = None,
                         read: set[int] | None = None, deadline: Deadline = NEVER) -> dict[str, dict] | None:
        """Locality of every routed expert (issue 13): its mean gate on its own episodes' probe
        questions, on the fixed everyday questions (assets/general_questions.jsonl) and on the
        other consolidated episodes' probes; `current` adds the running sleep's expert → episodes,
        `read` (`probed_episodes`) keeps the questions of those episodes only. None when the
        `deadline` passed before it was read."""
        owners = {**self.expert_episodes(), **(current or {})}
        owners = {e: ids for e, ids in owners.items() if e in self.memory.expert_ids()}
        if not owners:
            return {}
        episodes = {e.id: e for e in self.state.episodes.all() if read is None or e.id in read}
        probes = {i: [p.q for p in episode_probes(episodes[i])] for ids in owners.values() for i in ids if i in episodes}
        everyday = [q for q, _ in general_questions()]
        asked = [(i, q) for i, qs in probes.items() for q in qs]
        with self.lock:
            gates = question_gates(self.memory, self.tokenizer, [q for _, q in asked] + everyday, list(owners),
                                   deadline=deadline)
        if gates is None:
            return None
        out = {}
        for eid, ids in owners.items():
            g = gates[eid]
            own = [v for (i, _), v in zip(asked, g) if i in ids]
            other = [v for (i, _), v in zip(asked, g) if i not in ids]
            out[eid] = {"episodes": ids, **gate_selectivity(own, g[len(asked):], other)}
        return out

    def _sleep_worker(self, number: int, pending, cfg: SleepConfig) -> None:
        """One sleep, a flat sequence of phases (docs/DESIGN.md §4–6); `SleepRun` times, guards and
        cancels them. Nothing is kept unless every phase and the sanity gate pass."""
        run = self._run = SleepRun(self, number, cfg)
        tensors, manifest = self.memory.memory_state()
        snapshot = ({k: v.clone() for k, v in tensors.items()}, manifest)
        summary: dict = {"sleep": number, "episode_ids": [e.id for e in pending], "settings": vars(cfg).copy(),
                         "left_out": sorted(i for i in self.state.episodes.excluded if i > self.state.consolidated_through())}
        try:
            with self.lock, float_weights(self.memory.lm), cancel_points(run.check, self.memory.lm):
                older = [e for e in self.state.episodes.all() if e.id <= self.state.consolidated_through()]
                read = probed_episodes(pending, older, cfg.probe_chat_turns, self.cfg.seed + number)
                probes = ([p for e in pending if e.id in read for p in episode_probes(e)],
                          [p for e in older if e.id in read for p in episode_probes(e)])
                turns = sum(e.kind != "taught" for e in [*older, *pending])
                if turns > cfg.probe_chat_turns:
                    summary["probes_read"] = {"chat_turns": cfg.probe_chat_turns, "of": turns}
                generic = GENERIC_TEXT.read_text()
                run.start_clock(after_reserve(cfg.budget_s, self._after_timed))
                with run.phase("probe_before"):
                    everyday = self._probe_before(run, probes, generic, cfg, summary)
                # how long the probes before took says how fast the machine is now (a first sleep)
                run.keep_for_after(after_reserve(cfg.budget_s, self._after_timed, run.phases["probe_before"]))
                run.tier_step = self._plan_tier_step(run, older + list(pending), cfg, summary)
                with run.phase("consolidation"):
                    owners = self._consolidate(run, pending, older, cfg, summary)
                summary["dreams"] = {"generated": 0, "kept": 0, "rewarded": 0}
                if cfg.dreaming and run.deadline.passed():   # the learning budget is spent
                    summary["dreams"]["skipped"] = "the sleep's time budget was spent"
                    run.emit("notice", message=f"no dreaming this time: the {cfg.budget_s:g} s budget is spent")
                elif cfg.dreaming:
                    with run.phase("dreaming"):
                        summary["dreams"] = self._dream(run, pending, list(owners), cfg)
                with run.phase("reset"):
                    self.memory.reset_fast_weights()
                    if run.tier_step:
                        summary["tier_consolidation"] = self._consolidate_tier(run, older + list(pending), cfg)
                with run.phase("probe_after"):
                    self._probe_after(run, probes, generic, everyday, owners, read, summary)
                self._sanity_gate(summary, cfg)
                with run.phase("checkpoint"):
                    self._checkpoint(run, pending, snapshot, summary)
                self._status = {"state": "awake", "last_sleep": number, "progress": 1.0}
                self._step_seconds = list(run.step_seconds) or self._step_seconds
                self._after_timed = after_seconds(run.phases)
                run.emit("done", summary=summary)
        except Cancelled:
            self._rollback(snapshot)
            self._status = {"state": "awake", "cancelled": number}
            self.events.emit("cancelled", number)
        except Exception as e:  # noqa: BLE001 - reported to the UI, model rolled back
            self._sleep_failed(run, e, snapshot, summary)
        finally:
            self._snapshot = None
            self.events.close()
            self.memory.freeze_all()

    def _probe_before(self, run: "SleepRun", probes, generic: str, cfg: SleepConfig, summary: dict):
        """Closed-book probes and generic perplexity before (tier 1 off), the pre-sleep model's own
        everyday answers (the sanity gate compares against them), and the teacher check. What the
        last sleep's probes after read in this same state is not read again (readings.py)."""
        lm, tok, readings = self.memory.lm, self.tokenizer, self.memory.readings
        new_probes, old_probes = probes
        with self.memory.configured(fast_weights=False):   # a Stop may land between any two readings
            summary["probe_accuracy_before"] = closed_book_accuracy(lm, tok, new_probes + old_probes, readings=readings)
            run.check()
            summary["general_ppl_before"] = self._generic_perplexity(generic)
            run.check()
            summary["answer_logprob_before"] = answer_logprob(lm, tok, new_probes)
        run.check()
        everyday = self.wake.fast.reference_chats()["guard"]
        run.check()
        everyday_before = self.wake.fast.guard_reading(False)
        run.check()
        summary.update(self._teacher_check(summary["general_ppl_before"], generic, cfg))
        if not summary["teacher_fast_weights"]:
            run.emit("notice", message=summary["teacher_note"])
        return everyday, everyday_before

    def _consolidate(self, run: "SleepRun", pending, older, cfg: SleepConfig, summary: dict) -> dict[str, list[int]]:
        """New tier-2 experts (or, without expansion, the newest one) learn the episodes; returns
        expert → the episodes it holds (`episode_groups`)."""
        tier2 = [e for e in self.memory.experts() if e.tier == 2]
        if cfg.expansion or not tier2:
            groups = episode_groups(pending, cfg.episode_experts)
            owners = {self.memory.add_expert(tier=2, born=run.number, gate_bias=cfg.gate_bias_init): ids
                      for ids in groups}
            summary["experts_added"] = list(owners)
        else:
            owners = {tier2[-1].expert_id: [e.id for e in pending]}
            summary["experts_added"] = []
        summary["expert_episodes"] = owners
        for info in (e for e in self.memory.experts() if e.expert_id in owners):
            run.emit("expert", expert_id=info.expert_id, tier=2, layers=info.layers, params=info.params,
                     born=run.number, episodes=owners[info.expert_id])
        writing, training = run.deadlines(cfg.dreaming, run.tier_step)
        seeder = Consolidator(self.memory, self.tokenizer, cfg, run.emit, run.check, seed=self.cfg.seed + run.number,
                              teacher_fast_weights=summary["teacher_fast_weights"], writing=writing, training=training)
        new_ids = list(owners)
        t0 = time.perf_counter()
        closed = seeder.close_older_gates(pending, older, new_ids)   # before the teacher reads with them
        if closed:
            summary["older_gates"] = closed
            summary["older_gates_s"] = round(time.perf_counter() - t0, 1)
        examples = seeder.teacher_data(pending, older, new_ids)
        gates = {eid: set(ids) for eid, ids in owners.items()} if len(owners) > 1 else None
        summary["consolidation"] = seeder.seed(examples, new_ids, gates)
        cut = budget_cut_note(summary["consolidation"], cfg.budget_s)
        if cut:
            run.emit("notice", message=cut)
        return owners

    def _dream(self, run: "SleepRun", pending, new_ids: list[str], cfg: SleepConfig) -> dict:
        # τ = closed-book likelihood of the episodes' own facts (cloze items from their text), not
        # the probe QA: those are the test and must not steer training
        facts = [p for e in pending for p in cloze_probes(e.id, e.text, limit=6)]
        return Dreamer(self.memory, self.tokenizer, cfg, run.emit, run.check, seed=self.cfg.seed + run.number,
                       deadline=run.deadline).run(pending, facts, new_ids)

    def _probe_after(self, run: "SleepRun", probes, generic: str, everyday, current: dict, read: set[int],
                     summary: dict) -> None:
        lm, tok = self.memory.lm, self.tokenizer
        new_probes, old_probes = probes
        with self.memory.configured(fast_weights=False):   # (reset already: the same numbers, remembered)
            after = closed_book_accuracy(lm, tok, new_probes + old_probes, readings=self.memory.readings)
            summary["probe_accuracy_after"] = after
            run.check()
            summary["general_ppl_after"] = self._generic_perplexity(generic)
        run.check()
        summary["answer_logprob_after"] = answer_logprob(lm, tok, new_probes)
        run.check()
        chats, before = everyday
        summary.update(everyday_change(before, self.wake.fast.read(chats, fast_weights=False)))
        run.check()
        ids = [e.id for e in self.state.episodes.all() if e.id <= self.state.consolidated_through()] + \
            summary["episode_ids"]   # the older episodes, then this sleep's: a row of R
        # this sleep's tier step: its slow experts are in no manifest yet
        current = {**current, **slow_experts(summary.get("tier_consolidation"), ids)}
        # a report, not a safety reading: the one part of the probes after that the budget's end cuts
        # (it takes ~5 s of a quick sleep; the reserve for the probes after fell 0.3–1.6 s short twice
        # on 2026-12-06), before the checkpoint and commit (0.1–0.2 s) and a batch's length ahead
        # (a sleep that let a last batch start took 90.5 s)
        summary["gate_selectivity"] = self.gate_selectivity(current, read, deadline=run.end.earlier(COMMIT_S))
        if summary["gate_selectivity"] is None:
            summary["gate_selectivity"] = {}
            run.emit("notice", message=f"gate selectivity not read this time: the {run.cfg.budget_s:g} s budget "
                                       "ended first")
        summary["probe_after"] = {str(i): after.get(i, 0.0) for i in ids if i in read}
        run.emit("probe", row=summary["probe_after"], general_ppl=summary["general_ppl_after"],
                 before=summary["probe_accuracy_before"])

    def _generic_perplexity(self, generic: str) -> float:
        """Perplexity of the generic text as the memory is now, without tier 1 (remembered)."""
        return self.memory.readings.remember(
            "ppl:" + digest(generic), lambda: perplexity(self.memory.lm, self.tokenizer, generic),
            keep=True)

    @staticmethod
    def _sanity_gate(summary: dict, cfg: SleepConfig) -> None:
        """A sleep that wrecks everyday text or everyday answers is not committed."""
        ppl_b, ppl_a = summary["general_ppl_before"], summary["general_ppl_after"]
        if not math.isfinite(ppl_a):
            raise NumericalFault("probe_after", None, f"general perplexity after is {ppl_a}")
        if ppl_a > cfg.max_ppl_ratio * ppl_b:
            raise SleepRefused(f"general perplexity rose from {ppl_b:.2f} to {ppl_a:.2f} (×{ppl_a / ppl_b:.2f}, "
                               f"more than max_ppl_ratio = {cfg.max_ppl_ratio:g}); the sleep was not "
                               "committed and the memory is as it was before it")
        if summary["everyday_changed"] > cfg.max_everyday_changed:
            raise SleepRefused(f"the sleep changed {100 * summary['everyday_changed']:.0f}% of the model's "
                               f"everyday answers (more than max_everyday_changed = {cfg.max_everyday_changed:g}); "
                               "it was not committed and the memory is as it was before it")

    def _checkpoint(self, run: "SleepRun", pending, snapshot, summary: dict) -> None:
        run.guard("checkpoint")
        summary["consolidated_through"] = pending[-1].id
        summary["phases"] = run.phases
        tensors, manifest = self.memory.memory_state()
        manifest["model"] = self.backbone.name
        before = (snapshot[0], dict(snapshot[1], model=self.backbone.name))
        self.state.commit_sleep(run.number, tensors, manifest, summary, before=before)   # the commit point
        run.committed = True
        try:   # not needed for a restart (it loads the sleep's own memory then); keeps current fresh
            self.state.save_memory(tensors, manifest)
        except OSError as e:
            log.warning("sleep %d is committed; saving memory/current failed: %s", run.number, e)

    def _sleep_failed(self, run: "SleepRun", e: Exception, snapshot, summary: dict) -> None:
        """Before the commit point: roll back and report why; after it, the sleep happened."""
        number, message = run.number, f"{type(e).__name__}: {e}"
        if run.committed:
            log.exception("sleep %d committed; a step after the commit failed", number)
            self._status = {"state": "awake", "last_sleep": number, "progress": 1.0,
                            "warning": f"sleep {number} is committed, but {message}"}
            self.events.emit("done", number, summary=dict(summary, warning=message))
            return
        if not isinstance(e, (NumericalFault, SleepRefused)):
            log.exception("sleep %d failed", number)
        self._rollback(snapshot)
        where = {"phase": getattr(e, "phase", self._status.get("phase")),
                 "step": getattr(e, "step", self._status.get("step"))}
        self._status = {"state": "awake", "error": message, **where}
        self.events.emit("error", number, message=message, fatal=True,
                         reason="sanity gate" if isinstance(e, SleepRefused) else
                         "numerical fault" if isinstance(e, NumericalFault) else "error", **where)

    def _teacher_check(self, ppl_without: float, generic: str, cfg: SleepConfig) -> dict:
        """Sleep's teacher keeps tier 1 only if tier 1 does not make it worse on generic text
        (perplexity at most `teacher_max_drift` above the model without fast weights)."""
        if self.memory.fast_weight_norm() == 0:
            return {"teacher_fast_weights": True, "general_ppl_fast_weights": ppl_without,
                    "teacher_note": "tier 1 is empty"}
        with_fast = perplexity(self.memory.lm, self.tokenizer, generic)
        ok = with_fast <= ppl_without * (1 + cfg.teacher_max_drift)
        note = (f"the teacher uses the fast weights (generic perplexity {with_fast:.2f} with, "
                f"{ppl_without:.2f} without)" if ok else
                f"the fast weights make generic text worse (perplexity {with_fast:.2f} vs {ppl_without:.2f} "
                f"without, over the {100 * cfg.teacher_max_drift:.0f}% allowed): this sleep teaches without them")
        return {"teacher_fast_weights": ok, "general_ppl_fast_weights": with_fast, "teacher_note": note}

    def _rollback(self, snapshot) -> None:
        with self.lock:
            self.memory.load_memory_state(*snapshot)

    def _tier_step_due(self, number: int, cfg: SleepConfig) -> bool:
        return number % cfg.consolidate_every == 0 and self.memory.cfg.tiers >= 3 and \
            any(e.tier == 2 for e in self.memory.experts())

    def _plan_tier_step(self, run: "SleepRun", episodes, cfg: SleepConfig, summary: dict) -> bool:
        """Whether a due tier step gets its share (half) of the budget: not when the last sleep's
        step time already says it cannot fit the whole budget — it would be deferred after the
        steps had lost that half for nothing (lab wake, quick, sleep 3: a 221-step tier step
        "needs ~1460 s", 67 s of the budget went unused and consolidation ran 1 of 17 steps)."""
        if not self._tier_step_due(run.number, cfg):
            return False
        if not cfg.budget_s or not self._step_seconds:
            return True   # nothing measured yet: try it, the check before it still defers
        steps = distill_steps(cfg, teacher_prompt_count(tier_settings(cfg), episodes))
        need = tier_step_seconds(steps, self._step_seconds)
        if need is None or need <= cfg.budget_s:
            return True
        summary["tier_consolidation"] = self._defer_tier(
            run, [], f"its ~{steps} steps need ~{need:.0f} s at the last sleep's step time, "
                       f"more than the {cfg.budget_s:g} s budget")
        return False

    def _consolidate_tier(self, run: "SleepRun", episodes, cfg) -> dict:
        """Tier 2 → tier 3, a consolidation of every episode so far into new slow experts: the
        teacher is the model with its tier-2 experts and each episode's text in context, asked
        what a sleep's teacher is asked (`teacher_data`: seeds, restatements, self-study), the
        student answers without either. The episodes are grouped as a sleep groups them
        (`episode_groups`, `tier_experts` slow experts), each slow expert's gate fitted open on its
        group and shut on the others': one slow expert holding six passages swapped their towns
        and years (5 of 17 wrong answers, 0 of 10 before the step). The anchors of consolidation
        come along: without them one tier step moved everyday text by +25% perplexity (measured,
        lab knowledge 3-tier). Then the tier-2 experts are removed. Under a time budget the step
        runs only whole: removing the tier-2 experts after a cut merge lost every taught fact
        (make user-check, sleep 3: closed-book 2/16 → 0/24), so a step that would not fit, or was
        cut, leaves tier 2 as it is and waits for a sleep with time for it (`deferred`)."""
        tier2 = [e.expert_id for e in self.memory.experts() if e.tier == 2]
        writing, training = run.deadlines(dreaming_next=False, tier_step=False)
        cfg = tier_settings(cfg)
        seeder = Consolidator(self.memory, self.tokenizer, cfg, run.emit, run.check, seed=run.number,
                              writing=writing, training=training)
        steps = distill_steps(cfg, teacher_prompt_count(cfg, episodes))
        need = tier_step_seconds(steps, run.step_seconds)
        if run.deadline.at is not None and need is not None and need > run.deadline.left():
            return self._defer_tier(run, [], f"its ~{steps} steps need ~{need:.0f} s, "
                                            f"{max(0.0, run.deadline.left()):.0f} s of the budget are left")
        owners = {self.memory.add_expert(tier=3, born=run.number, gate_bias=cfg.gate_bias_init): ids
                  for ids in episode_groups(episodes, cfg.tier_experts)}
        for eid, ids in owners.items():
            run.emit("expert", expert_id=eid, tier=3, consolidates=tier2, episodes=ids)
        seeder.student_muted = tier2   # the student must answer without the tier-2 experts
        examples = seeder.teacher_data(episodes, [], list(owners))   # the teacher: the slow experts muted
        gates = {eid: set(ids) for eid, ids in owners.items()} if len(owners) > 1 else None
        result = seeder.seed(examples, list(owners), gates, phase="tier consolidation")
        written = seeder.written
        if written["answered"] < written["prompts"] or result["steps"] < result.get("planned_steps", 1):
            return self._defer_tier(run, list(owners), f"the budget cut it ({written['answered']}/{written['prompts']} "
                                                       f"answers written, {result['steps']}/"
                                                       f"{result.get('planned_steps', '?')} steps)")
        self.memory.remove_experts(tier2)
        return {"experts": owners, "removed": tier2, **result}

    def _defer_tier(self, run: "SleepRun", partial: list[str], why: str) -> dict:
        """The tier step does not happen this sleep: its partial experts (if any) go, tier 2 stays."""
        if partial:
            self.memory.remove_experts(partial)
        message = f"tier 2 → tier 3 deferred to a later sleep: {why}; the tier-2 experts stay as they are"
        run.emit("notice", message=message)
        return {"deferred": message}
