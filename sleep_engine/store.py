"""On-disk state (docs/DESIGN.md §7): the episode log and the saved memory, written so a crash loses
nothing that was acknowledged. Only JSON and safetensors are ever read back."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


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


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
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


class EpisodeLog:
    """Append-only JSON lines; each record is flushed and fsynced before `append` returns."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._episodes = self._read()

    def _read(self) -> list[Episode]:
        if not self.path.exists():
            return []
        out = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    out.append(Episode(**{k: d[k] for k in Episode.__dataclass_fields__ if k in d}))
                except (json.JSONDecodeError, TypeError, KeyError):
                    # a torn last line from a crash, or a hand edit: skip it, keep the rest
                    log.warning("episode log %s: skipping unreadable line %d", self.path, n)
        return out

    def __len__(self) -> int:
        return len(self._episodes)

    def all(self) -> list[Episode]:
        return list(self._episodes)

    def since(self, episode_id: int) -> list[Episode]:
        """Episodes with id > episode_id (those not yet consolidated by a later sleep)."""
        return [e for e in self._episodes if e.id > episode_id]

    def append(self, kind: str, text: str, **meta) -> Episode:
        ep = Episode(id=(self._episodes[-1].id + 1) if self._episodes else 1, kind=kind, text=text, **meta)
        with open(self.path, "a", encoding="utf-8") as f:
            # a torn line from an earlier crash must not swallow this record
            if f.tell() > 0 and not self._ends_with_newline():
                f.write("\n")
            f.write(ep.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._episodes.append(ep)
        return ep

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


class StateDir:
    """The run directory: episodes.jsonl, memory/ (current experts + fast weights)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.episodes = EpisodeLog(self.root / "episodes.jsonl")
        self.memory_tensors = self.root / "memory" / "current.safetensors"
        self.memory_manifest = self.root / "memory" / "current.json"

    # -- sleeps: sleeps/0001/{memory.safetensors, manifest.json, events.jsonl} ------------------
    def running_dir(self, number: int) -> Path:
        d = self.root / "sleeps" / f".running-{number:04d}"
        if d.exists():  # left by a killed process: its events are superseded
            for f in d.iterdir():
                f.unlink()
        d.mkdir(parents=True, exist_ok=True)
        return d

    def commit_sleep(self, number: int, tensors: dict[str, torch.Tensor], manifest: dict, summary: dict) -> Path:
        """Make a finished sleep durable: files into the running dir, then one atomic rename."""
        run = self.root / "sleeps" / f".running-{number:04d}"
        run.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(run / "memory.safetensors", tensors)
        atomic_write_json(run / "manifest.json", {"memory": manifest, **summary})
        final = self.root / "sleeps" / f"{number:04d}"
        os.replace(run, final)
        _fsync_dir(final.parent)
        return final

    def sleep_dirs(self) -> list[Path]:
        d = self.root / "sleeps"
        return sorted(p for p in d.iterdir() if p.name.isdigit() and (p / "manifest.json").exists()) if d.exists() else []

    def sleep_count(self) -> int:
        dirs = self.sleep_dirs()
        return int(dirs[-1].name) if dirs else 0

    def sleep_manifests(self) -> list[dict]:
        out = []
        for d in self.sleep_dirs():
            try:
                out.append(json.loads((d / "manifest.json").read_text()))
            except (OSError, json.JSONDecodeError):
                log.warning("sleep checkpoint %s is unreadable; skipped", d)
        return out

    def consolidated_through(self) -> int:
        """Id of the last episode a completed sleep consolidated (0 if none)."""
        return max((m.get("consolidated_through", 0) for m in self.sleep_manifests()), default=0)

    def load_last_sleep(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        for d in reversed(self.sleep_dirs()):
            try:
                return load_file(str(d / "memory.safetensors")), json.loads((d / "manifest.json").read_text())["memory"]
            except Exception:  # noqa: BLE001
                log.warning("sleep checkpoint %s is unreadable; trying an earlier one", d)
        return None

    def save_memory(self, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
        # tensors first, manifest last: a manifest always describes a complete tensor file
        manifest = dict(manifest, saved=time.time())
        atomic_save_tensors(self.memory_tensors, tensors)
        atomic_write_json(self.memory_manifest, manifest)

    def load_memory(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The saved memory, or None if there is none. A corrupt file is moved aside (kept for
        inspection) with a warning instead of stopping the lab."""
        if not self.memory_manifest.exists():
            return None
        try:
            manifest = json.loads(self.memory_manifest.read_text())
            tensors = load_file(str(self.memory_tensors))
            return tensors, manifest
        except Exception as e:  # noqa: BLE001 - any unreadable file is handled the same way
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for p in (self.memory_manifest, self.memory_tensors):
                if p.exists():
                    p.rename(p.with_name(f"{p.name}.corrupt-{stamp}"))
            log.warning("saved memory in %s is unreadable (%s); moved aside, starting without it",
                        self.root, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            return None
