"""On-disk state (docs/DESIGN.md §7): the episode log and the saved memory, written so a crash loses
nothing that was acknowledged. Only JSON and safetensors are ever read back."""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

SCHEMA = 2   # of every manifest this module writes; 1 = the layout before docs/reliability.md


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write temp file, fsync, rename over the target: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class Episode:
    """One unit of experience: a chat turn or a taught text (docs/DESIGN.md §3)."""
    id: int
    kind: str                   # "turn" | "taught"
    text: str                   # what the model should come to know (for a turn: user + reply)
    time: float = field(default_factory=time.time)
    messages: list[dict] | None = None   # for turns: [{"role", "content"}, ...]
    source: str | None = None            # for taught texts: file name or "pasted"
    qa: list[dict] | None = None         # probe items [{"q", "a"}], if known

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, ensure_ascii=False)


def qa_problem(qa) -> str | None:
    """Why probe items cannot be used (None if they can): a list of {"q": text, "a": text}."""
    if qa is None:
        return None
    if not isinstance(qa, list):
        return "qa must be a list of {\"q\", \"a\"} objects"
    for item in qa:
        if not (isinstance(item, dict) and isinstance(item.get("q"), str) and isinstance(item.get("a"), str)
                and item["q"].strip() and item["a"].strip()):
            return "each qa item must be an object with non-empty text fields \"q\" and \"a\""
    return None


def episode_problem(d) -> str | None:
    """Why a record of the episode log cannot be used (None if it can)."""
    if not isinstance(d, dict):
        return "not a JSON object (torn or hand-edited line)"
    if not (isinstance(d.get("id"), int) and not isinstance(d.get("id"), bool) and d["id"] > 0):
        return "no positive integer id"
    if d.get("kind") not in ("turn", "taught"):
        return "kind is not 'turn' or 'taught'"
    if not isinstance(d.get("text"), str) or not d["text"].strip():
        return "no text"
    if "time" in d and not (isinstance(d["time"], (int, float)) and not isinstance(d["time"], bool)):
        return "time is not a number"
    msgs = d.get("messages")
    if msgs is not None and not (isinstance(msgs, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)):
        return "messages is not a list of {role, content}"
    if d.get("source") is not None and not isinstance(d["source"], str):
        return "source is not text"
    return qa_problem(d.get("qa"))


class EpisodeLog:
    """Append-only JSON lines; each record is flushed and fsynced before `append` returns."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.notices: list[str] = []
        self._max_id = 0     # the largest id in the file, set-aside lines included: a new id never repeats one
        self._episodes = self._read()
        # beside the log: which episodes the user left out of sleeps, and the largest id ever given
        # (so that an id stays unique after a delete)
        self.flags_path = self.path.with_name("episode-flags.json")
        self.excluded: set[int] = set()
        self._read_flags()

    def _read(self) -> list[Episode]:
        if not self.path.exists():
            return []
        out: list[Episode] = []
        skipped = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    d = None
                if isinstance(d, dict) and isinstance(d.get("id"), int) and not isinstance(d["id"], bool):
                    self._max_id = max(self._max_id, d["id"])
                why = episode_problem(d)
                if why is None and out and d["id"] <= out[-1].id:
                    why = f"id {d['id']} repeats or goes back (after {out[-1].id})"
                if why is None:
                    out.append(Episode(**{k: d[k] for k in Episode.__dataclass_fields__ if k in d}))
                else:
                    # a torn last line from a crash, or a bad record: skip it (it stays in the file), keep the rest
                    log.warning("episode log %s: skipping line %d (%s)", self.path, n, why)
                    skipped.append(f"{n} ({why})")
        if skipped:
            self.notices.append(f"episode log: {len(skipped)} unusable line(s) set aside (kept in the file, "
                                f"not used): line {', '.join(skipped[:5])}{' …' if len(skipped) > 5 else ''}")
        return out

    def __len__(self) -> int:
        return len(self._episodes)

    def all(self) -> list[Episode]:
        return list(self._episodes)

    def since(self, episode_id: int) -> list[Episode]:
        """Episodes with id > episode_id (those not yet consolidated by a later sleep)."""
        return [e for e in self._episodes if e.id > episode_id]

    def append(self, kind: str, text: str, **meta) -> Episode:
        ep = Episode(id=max(self._max_id, self._episodes[-1].id if self._episodes else 0) + 1, kind=kind, text=text, **meta)
        why = episode_problem(json.loads(ep.to_json()))
        if why:
            raise ValueError(f"episode not logged: {why}")
        with open(self.path, "a", encoding="utf-8") as f:
            # a torn line from an earlier crash must not swallow this record
            if f.tell() > 0 and not self._ends_with_newline():
                f.write("\n")
            f.write(ep.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._episodes.append(ep)
        self._max_id = ep.id
        return ep

    def _read_flags(self) -> None:
        try:
            d = json.loads(self.flags_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            self.notices.append(f"{self.flags_path.name} is unreadable: no episode is left out of sleeps")
            return
        if isinstance(d, dict):
            self.excluded = {i for i in d.get("excluded", []) if isinstance(i, int) and not isinstance(i, bool)}
            if isinstance(d.get("max_id"), int):
                self._max_id = max(self._max_id, d["max_id"])

    def _write_flags(self) -> None:
        atomic_write_json(self.flags_path, {"excluded": sorted(self.excluded), "max_id": self._max_id})

    def set_excluded(self, ids, excluded: bool) -> None:
        """Leave episodes out of (or back into) the next sleeps."""
        self.excluded = (self.excluded | set(ids)) if excluded else (self.excluded - set(ids))
        self._write_flags()

    def delete(self, ids) -> None:
        """Remove episodes from the log for good: the file is rewritten without their lines
        (atomically; unusable lines set aside earlier stay as they were)."""
        ids = set(ids)
        self._write_flags()          # the largest id first: a later append never reuses a deleted one
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                d = None
            if not (isinstance(d, dict) and d.get("id") in ids and episode_problem(d) is None):
                kept.append(line if line.endswith("\n") else line + "\n")
        atomic_write_bytes(self.path, "".join(kept).encode("utf-8"))
        self._episodes = [e for e in self._episodes if e.id not in ids]
        self.excluded -= ids
        self._write_flags()

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


class StateError(RuntimeError):
    """The state directory cannot be used as it is (written by a newer lab, foreign layout)."""


class StateLocked(StateError):
    """Another process is writing to this state directory."""


def _crashpoint(name: str) -> None:
    """Test hook: SLEEP_LAB_CRASH_AT=name kills this process right here (the kill-stress test
    uses it to land a kill -9 at each step of a commit, not only at random instants)."""
    if os.environ.get("SLEEP_LAB_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def valid_memory_manifest(m) -> bool:
    """The shape MemoryModel.load_memory_state reads."""
    if not isinstance(m, dict) or not isinstance(m.get("experts", []), list):
        return False
    for e in m.get("experts", []):
        if not (isinstance(e, dict) and isinstance(e.get("expert_id"), str)
                and all(isinstance(e.get(k), int) and not isinstance(e.get(k), bool) for k in ("tier", "born", "rank"))):
            return False
    return True


def sleep_manifest_problem(m) -> str | None:
    """Why a sleep manifest cannot be used (None if it can)."""
    if not isinstance(m, dict):
        return "not a JSON object"
    if isinstance(m.get("schema"), int) and m["schema"] > SCHEMA:
        return f"written by a newer Sleep Lab (schema {m['schema']}, this one reads up to {SCHEMA})"
    ids = m.get("episode_ids")
    if not (isinstance(ids, list) and all(_is_int(i) for i in ids)):
        return "episode_ids is not a list of ids"
    if not _is_int(m.get("consolidated_through", 0)):
        return "consolidated_through is not an id"
    if not valid_memory_manifest(m.get("memory")):
        return "its memory manifest has the wrong shape"
    return None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class SleepRecord:
    number: int
    dir: Path
    manifest: dict

    @property
    def uid(self) -> str:
        return self.manifest.get("uid") or f"legacy-{self.number:04d}"


class StateDir:
    """The run directory (docs/DESIGN.md §7, docs/reliability.md):

        lock                     flock'ed by the one process that writes here (released by the OS on a crash)
        episodes.jsonl           append-only episode log, one fsync per record
        memory/current.safetensors   experts + fast weights, with its manifest in the file's own header
                                 (one file, one atomic rename: tensors and manifest cannot tear apart);
                                 the manifest names the sleep it builds on (`base_sleep`)
        sleeps/NNNN/             one completed sleep: memory.safetensors (after), before.safetensors
                                 (the memory it started from, for undo), manifest.json, events.jsonl

    A sleep is committed by ONE operation: the rename of `sleeps/.running-NNNN` to `sleeps/NNNN`.
    The newest readable sleep is the head: it says which episodes are consolidated, and its memory
    is loaded unless memory/current builds on that very sleep (then current is newer: fast
    weights learned since). So a crash at any instant leaves either the sleep (experts and
    consolidated episodes together) or nothing of it."""

    def __init__(self, root: Path, lock: bool = True):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_file = None
        if lock:
            self._acquire_lock()
        self.notices: list[str] = []           # what was set aside on opening, said to the user too
        self.episodes = EpisodeLog(self.root / "episodes.jsonl")
        self.notices += self.episodes.notices
        self.memory_tensors = self.root / "memory" / "current.safetensors"
        self.memory_manifest = self.root / "memory" / "current.json"    # schema 1 (read for migration only)
        self._head: SleepRecord | None = None
        self._scan_sleeps()

    # -- one writer ---------------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        path = self.root / "lock"
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise StateLocked(f"state dir {self.root} is in use by another Sleep Lab process ({holder}); "
                              "stop that one first or use another --state-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}: {' '.join(os.path.basename(a) for a in sys.argv[:2])}\n")
        f.flush()
        self._lock_file = f

    def close(self) -> None:
        """Release the writer lock (a crash releases it too: the OS drops flock locks)."""
        if self._lock_file is not None:
            try:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            finally:
                self._lock_file.close()
                self._lock_file = None

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        self.notices.append(message)

    def _set_aside(self, path: Path, why: str) -> None:
        target = path.with_name(f".set-aside-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        try:
            os.replace(path, target)
            self._warn(f"{path.relative_to(self.root)} {why}; set aside as {target.name}")
        except OSError:
            self._warn(f"{path.relative_to(self.root)} {why}; skipped")

    # -- sleeps: sleeps/0001/{memory.safetensors, before.safetensors, manifest.json, events.jsonl} --
    def _scan_sleeps(self) -> None:
        """Find the head: the newest sleep whose manifest and memory file check out. Newer ones
        that do not (a truncated checkpoint, a manifest pointing at missing files) are set aside
        with a warning, so their episodes are pending again and none of their experts load."""
        self._head = None
        d = self.root / "sleeps"
        if not d.exists():
            return
        for p in sorted((p for p in d.iterdir() if p.name.isdigit() and p.is_dir()), reverse=True):
            why = self._sleep_problem(p, check_files=True)
            if why is None:
                self._head = SleepRecord(int(p.name), p, json.loads((p / "manifest.json").read_text()))
                return
            if why == "newer":
                raise StateError(f"{p} was written by a newer Sleep Lab (schema > {SCHEMA}); use that version")
            self._set_aside(p, f"is not a usable sleep ({why}); falling back to the sleep before it")

    def _sleep_problem(self, p: Path, check_files: bool) -> str | None:
        try:
            m = json.loads((p / "manifest.json").read_text())
        except FileNotFoundError:
            return "no manifest.json"
        except (OSError, ValueError) as e:
            return f"manifest unreadable: {str(e)[:100]}"
        why = sleep_manifest_problem(m)
        if why and "newer" in why:
            return "newer"
        if why:
            return why
        if check_files:
            mem = p / "memory.safetensors"
            if not mem.is_file():
                return "memory.safetensors is missing"
            if m.get("memory_sha256") and _sha256(mem) != m["memory_sha256"]:
                return "memory.safetensors does not match its checksum (truncated or changed)"
            if not m.get("memory_sha256"):
                try:   # schema 1: no checksum; a file that safetensors can read will do
                    load_file(str(mem))
                except Exception as e:  # noqa: BLE001
                    return f"memory.safetensors unreadable ({str(e)[:80]})"
        return None

    def head(self) -> SleepRecord | None:
        return self._head

    def running_dir(self, number: int) -> Path:
        d = self.root / "sleeps" / f".running-{number:04d}"
        if d.exists():  # left by a killed process: its events are superseded
            shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def commit_sleep(self, number: int, tensors: dict[str, torch.Tensor], manifest: dict, summary: dict,
                     before: tuple[dict[str, torch.Tensor], dict] | None = None) -> Path:
        """Make a finished sleep durable. Every file goes into the running dir first (fsynced);
        the rename of that dir to sleeps/NNNN is the one commit point."""
        run = self.root / "sleeps" / f".running-{number:04d}"
        run.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(run / "memory.safetensors", tensors, {"manifest": json.dumps(manifest)})
        if before is not None:
            atomic_save_tensors(run / "before.safetensors", before[0], {"manifest": json.dumps(before[1])})
        full = {"schema": SCHEMA, "uid": uuid.uuid4().hex, "committed": time.time(),
                "base_sleep": self._head.uid if self._head else None, "memory": manifest,
                "memory_sha256": _sha256(run / "memory.safetensors"), **summary}
        atomic_write_json(run / "manifest.json", full)
        final = self.root / "sleeps" / f"{number:04d}"
        if final.exists():   # an unusable dir of that number (set aside on opening, or made since)
            self._set_aside(final, "was in the way of a new sleep")
        _crashpoint("sleep:before-commit")
        os.replace(run, final)          # ← the commit point
        _fsync_dir(final.parent)
        self._head = SleepRecord(number, final, full)
        _crashpoint("sleep:after-commit")
        return final

    def undo_last_sleep(self) -> tuple[int, tuple[dict[str, torch.Tensor], dict]]:
        """Take the head sleep back: its episodes become pending and its experts go. Returns
        (its number, the memory to load: the one it started from). The memory is written first
        (as building on the sleep before), then the sleep dir is renamed away: the commit point."""
        head = self._head
        if head is None:
            raise StateError("no completed sleep to undo")
        before = None
        if (head.dir / "before.safetensors").is_file():
            before = self._read_tensors(head.dir / "before.safetensors")
        if before is None:   # schema 1 or unreadable: the previous sleep's memory (or an empty one)
            prev = [p for p in self.sleep_dirs() if int(p.name) < head.number]
            before = self._read_tensors(prev[-1] / "memory.safetensors") if prev else ({}, {"experts": []})
            if before is None:
                raise StateError(f"cannot undo sleep {head.number}: the memory before it is unreadable")
        prev = self._previous_head(head.number)
        self._write_current(before[0], before[1], prev.uid if prev else None)
        _crashpoint("undo:before-commit")
        target = head.dir.with_name(f".undone-{head.dir.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(head.dir, target)    # ← the commit point
        _fsync_dir(target.parent)
        self._head = prev
        return head.number, before

    def _previous_head(self, below: int) -> SleepRecord | None:
        for p in reversed(self.sleep_dirs()):
            if int(p.name) < below and self._sleep_problem(p, check_files=True) is None:
                return SleepRecord(int(p.name), p, json.loads((p / "manifest.json").read_text()))
        return None

    def sleep_memories(self, number: int) -> tuple[tuple, tuple]:
        """(memory before, memory after) of committed sleep `number`, each (tensors, manifest)."""
        d = self.root / "sleeps" / f"{number:04d}"
        if d not in self.sleep_dirs():
            raise StateError(f"no completed sleep {number}")
        before, after = self._read_tensors(d / "before.safetensors"), self._read_tensors(d / "memory.safetensors")
        if before is None or after is None:
            raise StateError(f"sleep {number} has no readable memory from before it (made by an older Sleep Lab?)")
        return before, after

    def _read_tensors(self, path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            manifest = json.loads(meta["manifest"]) if "manifest" in meta else None
        except Exception:  # noqa: BLE001 - any unreadable file is handled the same way
            return None
        if manifest is None:
            return None
        return tensors, manifest

    def sleep_dirs(self) -> list[Path]:
        """Completed sleeps with a readable, well-formed manifest, oldest first (for the views)."""
        d = self.root / "sleeps"
        if not d.exists():
            return []
        return sorted(p for p in d.iterdir() if p.name.isdigit() and p.is_dir()
                      and self._sleep_problem(p, check_files=False) is None)

    def sleep_count(self) -> int:
        return self._head.number if self._head else 0

    def sleep_manifests(self) -> list[dict]:
        """The manifests of the sleeps that lead to the head (for the panels: well-formed only)."""
        out = []
        for d in self.sleep_dirs():
            if self._head is not None and int(d.name) > self._head.number:
                continue
            try:
                out.append(json.loads((d / "manifest.json").read_text()))
            except (OSError, json.JSONDecodeError):
                log.warning("sleep checkpoint %s is unreadable; skipped", d)
        return out

    def consolidated_through(self) -> int:
        """Id of the last episode the head sleep consolidated (0 if none)."""
        return self._head.manifest.get("consolidated_through", 0) if self._head else 0

    def load_last_sleep(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        if self._head is None:
            return None
        saved = self._read_tensors(self._head.dir / "memory.safetensors")
        if saved is not None:
            return saved[0], self._head.manifest["memory"]
        try:   # schema 1: a bare safetensors file, the manifest in manifest.json
            return load_file(str(self._head.dir / "memory.safetensors")), self._head.manifest["memory"]
        except Exception:  # noqa: BLE001
            return None

    # -- the current memory (fast weights change it between sleeps) --------------------------------
    def _write_current(self, tensors, manifest, base: str | None) -> None:
        manifest = dict(manifest, schema=SCHEMA, base_sleep=base, saved=time.time())
        atomic_save_tensors(self.memory_tensors, tensors, {"manifest": json.dumps(manifest)})
        if self.memory_manifest.exists():   # schema 1 leftover: superseded by the file above
            self.memory_manifest.unlink()

    def save_memory(self, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
        self._write_current(tensors, manifest, self._head.uid if self._head else None)

    def load_memory(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """memory/current as saved, or None if there is none. A corrupt file is moved aside (kept
        for inspection) with a warning instead of stopping the lab."""
        if not self.memory_tensors.exists():
            return None
        saved = self._read_tensors(self.memory_tensors)
        if saved is None and self.memory_manifest.exists():   # schema 1: tensors + current.json
            try:
                saved = load_file(str(self.memory_tensors)), json.loads(self.memory_manifest.read_text())
            except Exception:  # noqa: BLE001
                saved = None
        if saved is not None and not valid_memory_manifest(saved[1]):
            saved = None
        if saved is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for p in (self.memory_manifest, self.memory_tensors):
                if p.exists():
                    p.rename(p.with_name(f"{p.name}.corrupt-{stamp}"))
            self._warn(f"saved memory in {self.root} is unreadable; moved aside, starting from the last sleep")
            return None
        if isinstance(saved[1].get("schema"), int) and saved[1]["schema"] > SCHEMA:
            raise StateError(f"{self.memory_tensors} was written by a newer Sleep Lab (schema {saved[1]['schema']})")
        return saved

    def load_state(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The memory to start from: memory/current if it builds on the head sleep, else the head
        sleep's own memory (a crash between the commit and the next save), else nothing."""
        current = self.load_memory()
        head = self._head
        if current is not None:
            base = current[1].get("base_sleep", "schema-1")
            if base == "schema-1":   # no base recorded: trust it only if saved after the head sleep
                fresh = head is None or current[1].get("saved", 0) >= head.manifest.get(
                    "committed", (head.dir / "manifest.json").stat().st_mtime)
            else:
                fresh = base == (head.uid if head else None)
            if fresh:
                return current
            log.info("memory/current builds on another sleep than the last one; loading sleep %s",
                     head.number if head else "none")
        if head is None:
            if current is not None:
                self._warn("memory/current builds on a sleep that is gone; starting with no experts")
            return None
        saved = self.load_last_sleep()
        if saved is None:
            raise StateError(f"{head.dir}/memory.safetensors became unreadable")
        return saved
