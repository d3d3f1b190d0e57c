"""Typed events of a Sleep and a thread-safe fan-out with replay for late subscribers (a page
reload re-attaches to a running sleep and sees everything so far)."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

KINDS = ("phase", "loss", "sample", "dream", "expert", "probe", "timing", "error", "done", "cancelled",
         "notice")


@dataclass
class Event:
    kind: str          # one of KINDS
    sleep: int         # which sleep (1, 2, ...)
    data: dict
    seq: int = 0
    t: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


class EventBus:
    def __init__(self):
        self._events: list[Event] = []
        self._cond = threading.Condition()
        self._log = None

    def start(self, log_path: Path | None) -> None:
        with self._cond:
            self._events = []
            if self._log:
                self._log.close()
            self._log = open(log_path, "a", encoding="utf-8") if log_path else None

    def emit(self, kind: str, sleep: int, **data) -> Event:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        with self._cond:
            ev = Event(kind, sleep, data, seq=len(self._events))
            self._events.append(ev)
            if self._log:
                self._log.write(ev.to_json() + "\n")
                self._log.flush()
            self._cond.notify_all()
        return ev

    def close(self) -> None:
        with self._cond:
            if self._log:
                self._log.close()
                self._log = None

    def since(self, seq: int) -> list[Event]:
        with self._cond:
            return self._events[seq:]

    def wait(self, seq: int, timeout: float) -> list[Event]:
        """Events from `seq` on; waits up to `timeout` seconds for at least one."""
        with self._cond:
            if len(self._events) <= seq:
                self._cond.wait(timeout)
            return self._events[seq:]

    def subscribe(self):
        """An iterator over every event of the current sleep, from its start, as they come."""
        seq = 0
        while True:
            batch = self.wait(seq, 1.0)
            for ev in batch:
                yield ev
                if ev.kind in ("done", "cancelled") or (ev.kind == "error" and ev.data.get("fatal")):
                    return
            seq += len(batch)
