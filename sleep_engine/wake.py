"""Wake (docs/DESIGN.md §3): streaming chat with routing traces, teaching, test-time fast-weight learning.

Every finished turn and every taught text is appended to the durable episode log: that log is the
experience a later Sleep consolidates. Tier 1 (the fast weights B_h A_h) learns from them as it
goes, within a bound (sleep_engine/fast_weights.py).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from .chat_format import WakeInputError, clean_text, encode_chat, encode_text  # noqa: F401 (re-exported)
from .config import ConfigError, WakeConfig
from .decoding import generate_tokens, make_decoder, stop_token_ids
from .fast_weights import FastWeightLearner
from .memory import MemoryModel, RoutingTrace
from .store import Episode, EpisodeLog, qa_problem


class WakeBusy(RuntimeError):
    """The model is busy (another reply or a memory update) for longer than we wait."""


@dataclass
class Reply:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)   # truncation etc., shown to the user
    trace: RoutingTrace | None = None
    done: bool = False
    stopped: bool = False
    prompt_tokens: int = 0
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    episode_id: int | None = None
    fast_update: dict | None = None

    def token_texts(self, tokenizer) -> list[str]:
        return [tokenizer.decode([t]) for t in self.token_ids]


ASLEEP_NOTICE = ("The model is asleep: this reply comes from its memory as it was before the sleep; "
                 "the turn is kept for the next sleep.")
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "repetition_penalty")   # per reply
DEFAULT_SESSION = "local"      # the terminal chat and any caller that names no session
MAX_SESSIONS = 512             # conversations kept in memory (the least recently used go first)


class WakeSession:
    """The conversations with the memory model, one per session key (a browser, an API client,
    the terminal): each sees, retries and clears only its own turns. Thread-safe: one reply or
    update at a time. `history` is the default session's conversation."""

    def __init__(self, memory: MemoryModel, tokenizer, episodes: EpisodeLog, cfg: WakeConfig,
                 lock: threading.RLock | None = None, on_memory_change=None, asleep=None):
        self.memory, self.lm, self.tokenizer = memory, memory.lm, tokenizer
        self.episodes, self.cfg = episodes, cfg
        self.lock = lock or threading.RLock()       # the live model's: a sleep holds it throughout
        self.on_memory_change = on_memory_change    # called after fast weights change (to save them)
        # while a sleep runs: the pre-sleep memory (MemoryModel.twin) that Wake answers from
        self.asleep = asleep or (lambda: None)
        self._snapshot_lock = threading.Lock()      # one reply at a time on the snapshot too
        self._snapshot_decoder: tuple | None = None  # (snapshot, its decoder), built on first use
        self._conv_lock = threading.RLock()         # conversations: never waits on a sleep
        self._learning: threading.Thread | None = None   # a background fast-weight update
        self.decoder = make_decoder(self.lm, cfg.context_tokens + cfg.max_new_tokens)
        self.stop_ids = stop_token_ids(tokenizer, self.lm)
        self.conversations: OrderedDict[str, list[dict]] = OrderedDict()
        self.pending_for_fast_update: list[Episode] = []
        self.fast = FastWeightLearner(memory, tokenizer, cfg)
        self.last_fast_update: dict | None = None

    # -- conversations ---------------------------------------------------------------------
    def conversation(self, session: str = DEFAULT_SESSION) -> list[dict]:
        """A copy of one session's turns ([] for a session not seen yet)."""
        with self._conv_lock:
            return [{"role": m["role"], "content": m["content"]} for m in self.conversations.get(session, [])]

    def _set_conversation(self, session: str, history: list[dict]) -> None:
        with self._conv_lock:
            self.conversations[session] = history
            self.conversations.move_to_end(session)
            while len(self.conversations) > MAX_SESSIONS:
                self.conversations.popitem(last=False)

    @property
    def history(self) -> list[dict]:
        return self.conversation(DEFAULT_SESSION)

    @history.setter
    def history(self, value: list[dict]) -> None:
        self._set_conversation(DEFAULT_SESSION, list(value))

    # -- prompt ----------------------------------------------------------------------------
    def _encode(self, messages: list[dict], system: str | None = None) -> list[int]:
        system = self.cfg.system_prompt if system is None else system
        msgs = ([{"role": "system", "content": system}] if system else []) + messages
        return encode_chat(self.tokenizer, msgs)   # what people typed stays text, never template structure

    def build_prompt(self, message: str, session: str = DEFAULT_SESSION,
                     system: str | None = None) -> tuple[list[int], list[str]]:
        """Token ids for the session's history + message within `context_tokens`; oldest turns go
        first, then the message itself is cut (with a notice, never an error). `system` replaces
        the configured system prompt for this prompt (an API client's own)."""
        notices: list[str] = []
        history = list(self.conversations.get(session, []))
        ids = self._encode(history + [{"role": "user", "content": message}], system)
        dropped = 0
        while len(ids) > self.cfg.context_tokens and history:
            history = history[2:]
            dropped += 1
            ids = self._encode(history + [{"role": "user", "content": message}], system)
        if dropped:
            notices.append(f"{dropped} older turn(s) left the context window ({self.cfg.context_tokens} tokens)")
        if len(ids) > self.cfg.context_tokens:
            overhead = len(self._encode([{"role": "user", "content": ""}], system))
            keep = max(1, self.cfg.context_tokens - overhead - 8)
            msg_ids = encode_text(self.tokenizer, message)
            message = self.tokenizer.decode(msg_ids[:keep])
            ids = self._encode([{"role": "user", "content": message}], system)[: self.cfg.context_tokens]
            notices.append(f"message truncated to its first {keep} tokens to fit the context window "
                           f"({self.cfg.context_tokens} tokens)")
        self._set_conversation(session, history)
        return ids, notices

    # -- chat ------------------------------------------------------------------------------
    def stream(self, message, stop_event: threading.Event | None = None, seed: int = 0,
               session: str = DEFAULT_SESSION, system: str | None = None,
               sampling: dict | None = None) -> Iterator[Reply]:
        """Yield the growing reply (cumulative text); the last one has done=True and the
        routing trace. The finished turn is logged as an episode. `sampling` overrides any of
        SAMPLING_FIELDS for this reply (checked like the config)."""
        message, notices = clean_text(message, "message", self.cfg.max_message_chars)
        gen = self.sampling(sampling)
        memory, decoder, lock = self._acquire_model()
        try:
            prompt, more = self.build_prompt(message, session, system)
            reply = Reply(notices=notices + more, prompt_tokens=len(prompt))
            if memory is not self.memory:
                reply.notices.insert(0, ASLEEP_NOTICE)
            t0 = time.perf_counter()
            with memory.tracing() as trace:
                for tok in generate_tokens(decoder, prompt, gen.max_new_tokens, self.stop_ids, gen.temperature,
                                           gen.top_p, seed, stop_event, gen.repetition_penalty):
                    if reply.ttft_s is None:
                        reply.ttft_s = time.perf_counter() - t0
                    reply.token_ids.append(tok)
                    reply.text = self.tokenizer.decode(reply.token_ids, skip_special_tokens=True)
                    yield replace(reply, token_ids=list(reply.token_ids))  # a snapshot per chunk
            elapsed = time.perf_counter() - t0
            reply.trace = trace
            reply.stopped = bool(stop_event is not None and stop_event.is_set())
            if len(reply.token_ids) > 1 and reply.ttft_s is not None and elapsed > reply.ttft_s:
                reply.tokens_per_s = (len(reply.token_ids) - 1) / (elapsed - reply.ttft_s)
            turn = [{"role": "user", "content": message}, {"role": "assistant", "content": reply.text}]
            # the reply's own ids stay with it in the conversation (chat_format.generated_ids)
            kept = [turn[0], dict(turn[1], ids=[t for t in reply.token_ids if t not in self.stop_ids])]
            self._set_conversation(session, self.conversations.get(session, []) + kept)
            if reply.stopped or not reply.text:   # a cut-off or empty reply teaches nothing true
                reply.notices.append("not kept as an episode: the reply was " + ("stopped" if reply.stopped else "empty"))
            else:
                ep = self.episodes.append("turn", f"User: {message}\nAssistant: {reply.text}", messages=turn)
                reply.episode_id = ep.id
                reply.fast_update = self._after_episode(ep, asleep=memory is not self.memory)
        finally:
            lock.release()
        reply.done = True
        yield reply

    def _acquire_model(self, wait_s: float = 300.0) -> tuple[MemoryModel, object, threading.Lock]:
        """(memory, decoder, its lock, held): the live model, or while a sleep trains it, the
        snapshot of the memory from before the sleep — a reply never waits on a sleep."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            snapshot = self.asleep()
            if snapshot is not None:
                if self._snapshot_lock.acquire(timeout=0.1):
                    if self._snapshot_decoder is None or self._snapshot_decoder[0] is not snapshot:
                        # beside the sleep's training: its threads must not hold the cores the trainer needs
                        decoder = make_decoder(snapshot.lm, self.decoder.max_len, beside_work=True)
                        self._snapshot_decoder = (snapshot, decoder)
                    return snapshot, self._snapshot_decoder[1], self._snapshot_lock
            elif self.wait_for_learning(0.1) and self.lock.acquire(timeout=0.1):
                self._snapshot_decoder = None    # the sleep is over: its snapshot can go
                return self.memory, self.decoder, self.lock
        raise WakeBusy("the model is busy; try again in a moment")

    def reply(self, message, stop_event: threading.Event | None = None, session: str = DEFAULT_SESSION,
              **kwargs) -> Reply:
        last = Reply()
        for last in self.stream(message, stop_event, session=session, **kwargs):
            pass
        return last

    def sampling(self, overrides: dict | None) -> WakeConfig:
        """The Wake config with one reply's sampling settings applied (ConfigError if out of range)."""
        unknown = set(overrides or {}) - set(SAMPLING_FIELDS)
        if unknown:
            raise WakeInputError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}")
        if not overrides:
            return self.cfg
        try:
            cfg = replace(self.cfg, **overrides)
            cfg.validate()
        except (ConfigError, TypeError) as e:
            raise WakeInputError(str(e)) from None
        return cfg

    def open_conversation(self, session: str, history: list[dict]) -> None:
        """Start `session` from given turns (an API client sends its whole conversation each time)."""
        self._set_conversation(session, [{"role": m["role"], "content": m["content"]} for m in history])

    def clear(self, session: str = DEFAULT_SESSION) -> None:
        with self._conv_lock:
            self.conversations.pop(session, None)

    def drop_last_turn(self, session: str = DEFAULT_SESSION) -> str | None:
        """Take the session's last turn out of its conversation (to retry it); returns its user
        message. The turn stays in the episode log: it was experience all the same."""
        with self._conv_lock:
            history = self.conversations.get(session, [])
            if len(history) >= 2 and history[-1]["role"] == "assistant":
                message = history[-2]["content"]
                self._set_conversation(session, history[:-2])
                return message
        return None

    def context_tokens(self, session: str = DEFAULT_SESSION) -> int:
        history = self.conversation(session)
        return len(self._encode(history)) if history else 0

    # -- teaching and fast weights -----------------------------------------------------------
    def teach(self, text, source: str = "pasted", qa: list[dict] | None = None) -> Episode:
        """Add a text to read as an episode (it goes to the durable log before this returns)."""
        text, notices = clean_text(text, "taught text", self.cfg.max_message_chars)
        if qa_problem(qa):
            raise WakeInputError(f"probe items not taken: {qa_problem(qa)}")
        memory, _, lock = self._acquire_model()
        try:
            ep = self.episodes.append("taught", text.strip(), source=source, qa=qa)
            self._after_episode(ep, asleep=memory is not self.memory)
        finally:
            lock.release()
        return ep

    def _after_episode(self, ep: Episode, asleep: bool = False) -> dict | None:
        """Tier 1 learns from a taught text at once and from chat every `fast_update_every` turns;
        what comes during a sleep waits for its end (the sleep is training the live memory)."""
        if not self.cfg.fast_update_every:
            return None
        self.pending_for_fast_update.append(ep)
        if asleep:
            return None
        turns = sum(e.kind == "turn" for e in self.pending_for_fast_update)
        if ep.kind == "taught" or turns >= self.cfg.fast_update_every:
            episodes, self.pending_for_fast_update = self.pending_for_fast_update, []
            if not self.cfg.fast_in_background:
                return self.update_fast_weights(episodes)
            # after the reply: the caller holds the lock, so the update starts when it is released,
            # and the next reply waits for it (_acquire_model): the same order as in the foreground
            self._learning = threading.Thread(target=self.update_fast_weights, args=(episodes,),
                                              name="fast-weights", daemon=True)
            self._learning.start()
            return {"scheduled": True, "episodes": len(episodes)}
        return None

    def wait_for_learning(self, timeout: float | None = None) -> bool:
        """Wait for a background fast-weight update to end; False if it still runs after `timeout`."""
        learning = self._learning
        if learning is not None and learning is not threading.current_thread():
            learning.join(timeout)
            return not learning.is_alive()
        return True

    def learning(self) -> bool:
        """Whether a background fast-weight update is running (or about to)."""
        return self._learning is not None and self._learning.is_alive()

    def update_fast_weights(self, episodes: list[Episode], steps: int | None = None) -> dict:
        """A bounded update of B_h A_h from `episodes` (sleep_engine/fast_weights.py); returns
        its losses, KL and anchor-text drift."""
        with self.lock:
            self.last_fast_update = self.fast.update(episodes, steps)
            if self.on_memory_change and self.last_fast_update.get("steps"):
                self.on_memory_change()
            return self.last_fast_update
