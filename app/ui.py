"""The lab page (Gradio Blocks): Wake, Sleep and Inspect tabs over one SleepEngine.

The page only reads engine state and events and starts/stops engine work; the Sleep itself runs
in the engine's own worker thread, so a reload or a second tab re-attaches to it (a timer, 1 s
asleep and 5 s awake, polls `engine.status()` and the event bus and redraws only when something changed).
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import hmac
import html
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import gradio as gr

from sleep_engine.config import ConfigError, SleepConfig
from sleep_engine.engine import NothingToConsolidate
from sleep_engine.export import ExportError, export
from sleep_engine.lab.report import list_reports
from sleep_engine.wake import SAMPLING_FIELDS, WakeBusy, WakeInputError

from . import plots, views
from .lab_report import load_report

EXPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")   # a folder name, never a path
UPLOAD_LIMIT = 1 << 20       # bytes per uploaded text file (the server refuses larger uploads too)
SETTINGS = [("distill_steps", "consolidation steps (0 = auto)"), ("dreams", "m dreams"), ("keep_top", "top-k kept"),
            ("keep_random", "b random kept"), ("gamma", "γ (semantic vs edit reward)"),
            ("alpha", "α (divergence vs reward)"), ("lmbda", "λ (student-sampled fraction)"),
            ("budget_s", "time budget for the whole sleep, s (0 = none)")]
DREAM_WIDTHS = ["5%", "4%", "7%", "7%", "6%", "7%", "7%", "20%", "37%"]
INT_SETTINGS = {"distill_steps", "dreams", "keep_top", "keep_random"}

GUIDE = """**How the lab works, in three steps.**
1. **Teach** a text (on the right) or just chat: each becomes an *episode*. Teach does not put the
   text into the conversation; the fast weights (tier 1) pick it up within this session.
2. **Sleep now** (Sleep tab) consolidates the new episodes into a new expert — a minute or a few.
3. **Ask about it** without the text (Clear first): what is recalled now comes from the experts.
   Inspect shows what each sleep learned and what it changed; *Undo last sleep* takes one back."""

CSS = """
#header .fields {display:flex; flex-wrap:wrap; gap:6px 18px; font-size:0.92em}
#header .k {color:#777; margin-right:4px}
.badge {padding:2px 10px; border-radius:10px; font-weight:600}
.badge.awake {background:#e3f6e8; color:#17663a}
.badge.sleeping {background:#e6e4fb; color:#3b2f9c}
.bar {height:10px; background:#eee; border-radius:5px; overflow:hidden; margin:6px 0}
.bar > div {height:100%; background:#636efa; transition:width .5s}
.notice-error {color:#b3261e; font-weight:600}
"""

# gr.Plot mounts a fresh plot div on every update, so `layout.uirevision` alone cannot keep a zoom
# (measured: the range resets on the next redraw). This page script remembers each live panel's
# axis ranges from the user's own zoom/pan and puts them back on every redrawn div; a double-click
# (autorange) forgets them.
KEEP_ZOOM_JS = """
() => {
  const saved = {};
  const hook = (gd) => {
    const host = gd.closest('[id^="panel-"]');
    if (!host || gd.__keepZoom || !gd._fullLayout || !gd.on) return;
    gd.__keepZoom = true;
    const id = host.id, mine = saved[id] || (saved[id] = {});
    if (Object.keys(mine).length) window.Plotly.relayout(gd, Object.assign({}, mine));
    gd.on('plotly_relayout', (ev) => {
      for (const [k, v] of Object.entries(ev)) {
        const axis = k.split('.')[0];
        if (k.endsWith('.autorange') && v === true) {
          for (const key of Object.keys(mine)) if (key.startsWith(axis + '.')) delete mine[key];
        } else if (/^[xy]axis[0-9]*[.]range/.test(k)) {
          mine[k] = v;
        }
      }
    });
  };
  const scan = () => document.querySelectorAll('.js-plotly-plot').forEach(hook);
  new MutationObserver(() => requestAnimationFrame(scan)).observe(document.body, {childList: true, subtree: true});
}
"""


def _error(message: str) -> str:
    return f'<p class="notice-error">⚠️ {html.escape(message)}</p>'


def _ok(message: str) -> str:
    return f"<p>{html.escape(message)}</p>"


def read_upload(path: str | None) -> tuple[str, str]:
    """An uploaded file as (text, name); OSError with a clear message for oversize/binary/non-UTF-8."""
    name = os.path.basename(path or "")
    size = os.path.getsize(path)
    if size > UPLOAD_LIMIT:
        raise OSError(f"{name} is {size:,} bytes; the limit is {UPLOAD_LIMIT:,} bytes")
    data = Path(path).read_bytes()
    if b"\x00" in data:
        raise OSError(f"{name} looks like a binary file, not text")
    try:
        return data.decode("utf-8"), name
    except UnicodeDecodeError:
        raise OSError(f"{name} is not UTF-8 text") from None


# Streamed replies reach the page at most this often (the last one at once). Each update costs
# the server and, more, the browser CPU on the two cores that decode. Measured with the page in
# headless chromium (2026-12-06, 2 cores, three prompts × 4, side by side in one run): at one
# update per 100 ms the page's own decode rate was 73 tokens/s and a 79-token reply took
# 1.8–2.1 s to the last word; at one per 250 ms 86 tokens/s and 1.0–1.3 s.
STREAM_INTERVAL_S = 0.25

# The page's timer: every second while a sleep runs (its progress), every 5 s while awake. Each
# tick is a whole Gradio event; with the page open and idle, 1 s ticks cost the server ~35 ms and
# chromium ~120 ms of CPU per second, which the two cores' decoding pays for (issue 17).
ASLEEP_TICK_S, AWAKE_TICK_S = 1.0, 5.0
# While a sleep runs, its panels are redrawn at most this often (its progress line every tick):
# a redraw is ~0.1 s of the server's CPU and more of chromium's, on the cores the sleep trains on.
# A typical quick sleep with the page open on the Sleep tab ran 10 of 12 steps against 13 of 13
# without a page, chromium using 13.6 s of CPU (2026-12-06, redrawn every second).
PANELS_EVERY_S = 5.0


# Gradio's queue looks for new events every 1 ms while none waits, for as long as the server runs,
# a reply's own event included: on two cores every wake-up is taken from the decoder. Decoding with
# the page's server up and idle, alternating (2026-12-06, 2 cores, two runs of four rounds × three
# prompts): 106.8 and 119.0 tokens/s at 1 ms, 117.3 and 132.6 at 10 ms (118.4, 123.5 without a
# server); a sleep's kind of training step (8 × 96 tokens, an expert's parameters) 0.402 → 0.423
# steps/s (six rounds). An event then starts up to 10 ms later. (The Wake tab's own page / engine
# ratio showed no change through the noise of four runs.)
QUEUE_POLL_S = 0.01


def tick_every(sleeping: bool) -> float:
    return ASLEEP_TICK_S if sleeping else AWAKE_TICK_S


def _only_new_events(seen: list, now: list) -> bool:
    """Whether the page's key moved by new events alone (a running sleep), nothing else."""
    return len(seen) == len(now) and now[:2] == seen[:2] and now[3:5] == seen[3:5]


class _Newest:
    """A one-slot mailbox between a producer thread and its relay: the newest item, whether it
    is unread, and the producer's end (or error). Writing never wakes the reader per item."""

    def __init__(self):
        self.lock, self.changed, self.ended = threading.Lock(), threading.Event(), threading.Event()
        self.item, self.unread, self.error = None, False, None

    def put(self, item) -> None:
        with self.lock:
            self.item, self.unread = item, True
        self.changed.set()

    def end(self, error: BaseException | None = None) -> None:
        with self.lock:   # with the last item's lock: a reader that sees the end has seen that item
            self.error = error
            self.ended.set()
        self.changed.set()

    def take(self) -> tuple:
        """(item or None if nothing new, done, error), once something changed."""
        self.changed.wait()
        self.changed.clear()
        with self.lock:
            item, unread, self.unread = self.item, self.unread, False
            return (item if unread else None), self.ended.is_set(), self.error


def in_own_thread(make_iter, stop: threading.Event, interval_s: float | None = None):
    """Run an engine generator in one dedicated thread and relay its items, at most one per
    `interval_s`: the items are cumulative snapshots, so only the newest is passed on (the last
    item always is, at once). The relay sleeps out each interval rather than waking per item:
    a wake per token cost the decode ~5% (issue 17). The engine holds its (thread-owned) lock
    across yields, while Gradio may resume a generator on any worker thread; an exception in
    the producer is re-raised here, and closing this relay stops the producer."""
    interval_s = STREAM_INTERVAL_S if interval_s is None else interval_s
    box = _Newest()

    def produce():
        try:
            for item in make_iter():
                box.put(item)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            box.end(e)
        else:
            box.end()

    threading.Thread(target=produce, daemon=True, name="wake-stream").start()
    try:
        deadline = time.perf_counter()   # the first item goes out as soon as it is there
        while True:
            box.ended.wait(max(0.0, deadline - time.perf_counter()))   # the interval, cut short by the end
            item, done, error = box.take()
            if error is not None:
                raise error
            if item is not None:
                deadline = time.perf_counter() + interval_s
                yield item
            if done:
                return
    finally:
        stop.set()   # the page went away or the relay ended: let the producer finish its turn


def parse_more(text: str | None) -> dict[str, str]:
    """'key=value' lines (any SleepConfig field, as with the CLI's --set) → overrides."""
    out = {}
    for line in (text or "").splitlines():
        if line.strip() and not line.strip().startswith("#"):
            key, sep, value = line.partition("=")
            if not sep:
                raise ConfigError(f"expected key=value, got {line.strip()!r}")
            out[key.strip()] = value.strip()
    return out


def sleep_settings(preset: str | None, values, more: str | None) -> SleepConfig:
    """The Sleep tab's settings: the numeric fields, then the More settings lines, which win (a
    line is the more explicit choice; `dreams=-1` there was silently ignored before). ConfigError
    with one clear line for anything out of range."""
    overrides: dict = {}
    for (key, label), v in zip(SETTINGS, values):
        if v is None or v == "":
            raise ConfigError(f"{label} is empty")
        try:
            number = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"sleep.{key} must be a number, got {v!r}") from None
        if key in INT_SETTINGS and (not number.is_integer()):
            raise ConfigError(f"sleep.{key} must be a whole number, got {v!r}")
        overrides[key] = int(number) if key in INT_SETTINGS else number
    overrides.update(parse_more(more))
    return SleepConfig.from_preset(preset or "quick", **overrides)


class Sessions:
    """Conversation keys: one per browser (a random id kept in its localStorage, so a reload keeps
    its own conversation) or per API client (its session hash), and per login user."""

    def __init__(self, limit: int = 4096):
        self._browser: OrderedDict[str, str] = OrderedDict()   # session hash → browser id
        self._lock = threading.Lock()
        self.limit = limit

    def attach(self, request, browser_id) -> str:
        if not (isinstance(browser_id, str) and 16 <= len(browser_id) <= 64 and browser_id.isalnum()):
            browser_id = secrets.token_hex(16)
        if request is not None:
            with self._lock:
                self._browser[request.session_hash] = browser_id
                while len(self._browser) > self.limit:
                    self._browser.popitem(last=False)
        return browser_id

    def key(self, request) -> str:
        if request is None:
            return "api"
        with self._lock:
            base = self._browser.get(request.session_hash, f"client-{request.session_hash}")
        user = getattr(request, "username", None)
        return f"{user}:{base}" if user else base


def make_auth(auth: tuple[str, str] | None):
    """The login check for Gradio: constant-time comparison, and every wrong password slows the
    next tries down (100 wrong passwords took 3 s before: now each costs up to 2 s)."""
    if auth is None:
        return None
    user, password = auth
    digest = hashlib.sha256(password.encode()).digest()
    failures: list[float] = []
    lock = threading.Lock()

    def check(u: str, p: str) -> bool:
        ok = hmac.compare_digest(str(u).encode(), user.encode()) & hmac.compare_digest(
            hashlib.sha256(str(p).encode()).digest(), digest)
        if ok:
            return True
        with lock:
            now = time.monotonic()
            failures[:] = [t for t in failures if now - t < 60] + [now]
            delay = min(2.0, 0.1 * len(failures))
        time.sleep(delay)
        return False
    return check


class StopFlags:
    """One stop event per browser session, so Stop ends only that session's reply."""

    def __init__(self):
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def fresh(self, session: str) -> threading.Event:
        with self._lock:
            self._flags[session] = ev = threading.Event()
            return ev

    def stop(self, session: str) -> None:
        with self._lock:
            ev = self._flags.get(session)
        if ev:
            ev.set()


def reply_notes(reply) -> list[str]:
    """What the Wake notice says after a reply: its own notices, its speed and episode, and what
    tier 1 did with it."""
    notes = list(reply.notices)   # a stopped reply says so there ("not kept as an episode: …")
    if reply.tokens_per_s:
        notes.append(f"{len(reply.token_ids)} tokens, first after {1000 * (reply.ttft_s or 0):.0f} ms, "
                     f"{reply.tokens_per_s:.1f} tokens/s" + (f"; logged as episode {reply.episode_id}"
                                                             if reply.episode_id else ""))
    u = reply.fast_update or {}
    if u.get("scheduled"):
        notes.append(f"tier 1 is learning from the last {u['episodes']} episode(s) in the background "
                     "(your next reply starts when it is done)")
    elif u.get("steps"):
        notes.append(f"fast weights updated: loss {u['loss_before']:.3f} → {u['loss_after']:.3f}, "
                     f"generic-text drift {100 * u['drift']:+.1f}%")
    return notes


def teach_note(ep, source: str, body: str, asleep: bool, learning: bool) -> str:
    """What Teach did and what happens next."""
    note = f"taught {source} ({len(ep.text):,} characters) as episode {ep.id}"
    if asleep:
        note += "; the model is asleep: the next sleep consolidates it, tier 1 learns it when this one ends"
    elif learning:
        note += ("; tier 1 (the fast weights) is learning it in the background — ask about it in a moment. "
                 "Sleep now consolidates it into a new expert")
    else:
        note += "; Sleep now consolidates it into a new expert, so it is recalled without the text"
    if len(ep.text) < len(body.strip()):
        note += f"; it had {len(body):,} characters and only the first {len(ep.text):,} were kept"
    return note


class Page:
    """What the tabs share: the engine, this server's browser sessions (their stop flags and
    generation settings), the page-wide views (header, memory tiers, progress) and the folder the
    download buttons serve from. The tabs set their components on it as they are built."""

    def __init__(self, engine, reports_dir: str | Path):
        self.engine, self.reports_dir = engine, Path(reports_dir)
        self.stops, self.sessions = StopFlags(), Sessions()
        self.sampling: dict[str, dict] = {}   # session key → its generation settings (Generation accordion)
        self.usage = views.UsageMeter()
        self.download_dir = Path(tempfile.mkdtemp(prefix="sleep-lab-download-"))
        # copies of a user's events for the download buttons: gone when the app is (one per build_app)
        atexit.register(shutil.rmtree, self.download_dir, True)
        self.exports_dir = Path(engine.cfg.state_dir).parent / "exports"   # Inspect → Export writes only under here

    def header_html(self) -> str:
        status = self.engine.status()
        cls = "sleeping" if status.get("state") == "sleeping" else "awake"
        cells = []
        for k, v in views.header_fields(self.engine.info(), status):
            v = f'<span class="badge {cls}">{html.escape(v)}</span>' if k == "state" else html.escape(v)
            cells.append(f'<span><span class="k">{k}</span>{v}</span>')
        return f'<div class="fields">{"".join(cells)}</div>'

    def tiers_table(self, request: gr.Request | None = None):
        """The tiers panel of this browser's session (tier 0 counts its own conversation)."""
        return views.tier_rows(self.engine.memory_tiers(session=self.sessions.key(request)))

    @staticmethod
    def progress_html(status: dict) -> str:
        pct = 100 * status.get("progress", 0.0) if status.get("state") == "sleeping" else 0
        return (f'<div class="bar"><div style="width:{pct:.1f}%"></div></div>'
                f'<p id="progress-text">{html.escape(views.progress_text(status))}</p>')

    def asleep(self) -> bool:
        return self.engine.status().get("state") == "sleeping"

    def pace(self) -> float:
        """The timer's interval now: a running sleep's progress is shown every second."""
        return tick_every(self.asleep())

    def sleep_choices(self) -> list[str]:
        return [d.name for d in self.engine.state.sleep_dirs()]

    def status_api(self) -> dict:
        st = self.engine.status()
        st["events"] = len(self.engine.events.since(0))
        return json.loads(json.dumps(st, default=str))

    # -- what the timer and a page load redraw -------------------------------------------------
    def live(self) -> list:
        s = self.sleep
        return [self.panel_key, self.timer, self.header, s.progress, s.notes, s.cons_plot, s.samples, s.dream_plot, s.dream_df,
                s.forget_plot, s.growth_plot, s.locality_df, self.wake.tiers, self.inspect.pick, s.sleep_btn,
                s.stop_sleep_btn, s.episodes_df, s.sleep_notice]

    def tick(self, seen, request: gr.Request = None) -> dict:
        """Each tick: the progress line; the rest, and the timer's pace, only when something changed
        since `seen`."""
        engine, s = self.engine, self.sleep
        status = engine.status()
        now = [status.get("state"), status.get("sleep") or status.get("last_sleep"),
               len(engine.events.since(0)), status.get("sleeps"), len(engine.state.episodes), time.monotonic()]
        out = {s.progress: self.progress_html(status)}
        if seen is not None and now[:5] == seen[:5]:
            return out
        if seen is not None and _only_new_events(seen, now) and now[5] - seen[5] < PANELS_EVERY_S:
            return out   # a running sleep's panels: redrawn every few seconds, its progress line every tick
        if seen is None or seen[3] != now[3]:   # a sleep finished or was undone: the Inspect list follows
            choices = self.sleep_choices()
            out[self.inspect.pick] = gr.update(choices=choices, value=choices[-1] if choices else None)
        if seen is not None and (now[3] or 0) > (seen[3] or 0):   # "Sleep N started …" is old news: the progress line says it finished
            out[s.sleep_notice] = ""
        sleeping = status.get("state") == "sleeping"    # the buttons say what can be done now
        return {**out, **s.panels(), self.panel_key: now, self.timer: tick_every(sleeping), self.header: self.header_html(),
                self.wake.tiers: self.tiers_table(request), s.sleep_btn: gr.update(interactive=not sleeping),
                s.stop_sleep_btn: gr.update(interactive=sleeping), s.episodes_df: views.episode_table(engine.episode_rows())}

    def on_load(self, browser_id, request: gr.Request) -> dict:
        """A reload or a second tab re-attaches: conversation, routing, panels, running sleep (your
        own conversation only: the browser's id, kept in its localStorage, names it)."""
        browser_id = self.sessions.attach(request, browser_id)
        key = self.sessions.key(request)
        out = {self.browser: browser_id, self.wake.chatbot: self.engine.wake.conversation(key),
               **self.wake.routing(self.wake.reply_view(None)), **self.tick(None, request),
               self.inspect.reports.pick: gr.update(choices=self.inspect.reports.choices())}
        notes = self.engine.notices()
        if notes:
            out[self.inspect.notice] = _error("; ".join(notes))
        own = self.sampling.get(key)
        if own:   # a reload keeps this browser's generation settings
            out.update({c: own[f] for c, f in zip(self.wake.generation, SAMPLING_FIELDS)})
        return out

    def load_outputs(self) -> list:
        return ([self.browser, self.wake.chatbot, self.wake.heat, self.wake.strip, self.wake.load] + self.live()
                + [self.inspect.reports.pick, self.inspect.notice] + self.wake.generation)


class WakeTab:
    """Chat with the memory (streamed), teach a text, and the routing of the last reply."""

    def __init__(self, page: Page):
        self.page, self.engine = page, page.engine
        self.views: dict[str, dict] = {}   # session key → the routing of its reply that just ended
        with gr.Group() as self.guide:
            gr.Markdown(GUIDE, elem_id="guide")
            self.guide_ok = gr.Button("Got it", size="sm", elem_id="guide-ok")
        with gr.Row():
            with gr.Column(scale=3):
                self.chat_column()
            with gr.Column(scale=2):
                self.teach_text = gr.Textbox(label="Teach: a text for the model to read (becomes an episode)",
                                             lines=5, elem_id="teach-text")
                self.teach_file = gr.File(label="…or a UTF-8 text file (up to 1 MiB)", type="filepath",
                                          elem_id="teach-file")
                self.teach_btn = gr.Button("Teach", elem_id="teach")
                self.teach_notice = gr.HTML(elem_id="teach-notice")
        self.strip = gr.HighlightedText(label="Tokens of the last reply, coloured by dominant routed expert",
                                        elem_id="token-strip", show_legend=True)
        with gr.Row():
            self.heat = gr.Plot(label="Routing heatmap", elem_id="routing-heatmap", scale=3)
            self.load = gr.Plot(label="Expert load", elem_id="expert-load", scale=2)

    def chat_column(self) -> None:
        self.chatbot = gr.Chatbot(label="Chat", height=380, elem_id="chatbot")
        self.msg = gr.Textbox(placeholder="Message the model (Enter sends)", show_label=False, elem_id="message")
        with gr.Row():
            self.send = gr.Button("Send", variant="primary", elem_id="send")
            self.stop = gr.Button("Stop", elem_id="stop-reply")
            self.retry_btn = gr.Button("Retry", elem_id="retry")
            self.clear_btn = gr.Button("Clear", elem_id="clear")
        self.notice = gr.HTML(elem_id="wake-notice")
        # wrapped, in the column's width: unwrapped, "size" ran past the panel and hid the last two columns
        self.tiers = gr.Dataframe(headers=["tier", "memory", "size", "parameters", "age / experts"],
                                  label="Memory tiers", interactive=False, elem_id="tiers", wrap=True,
                                  column_widths=["8%", "20%", "38%", "14%", "20%"])
        self.fast_every = gr.Number(value=self.engine.cfg.wake.fast_update_every, precision=0, minimum=0,
                                    maximum=1000, elem_id="fast-every",
                                    label="test-time learning: update the fast weights every N turns "
                                          "(and after each taught text); 0 = off")
        w = self.engine.cfg.wake
        with gr.Accordion("Generation (this browser's replies)", open=False, elem_id="generation"):
            self.generation = [
                gr.Slider(1, w.max_new_tokens, value=w.max_new_tokens, step=1, label="max new tokens",
                          elem_id="gen-max-new-tokens"),
                gr.Slider(0.0, 2.0, value=w.temperature, step=0.05, label="temperature (0 = greedy)",
                          elem_id="gen-temperature"),
                gr.Slider(0.05, 1.0, value=w.top_p, step=0.05, label="top-p (with temperature > 0)",
                          elem_id="gen-top-p"),
                gr.Slider(1.0, 2.0, value=w.repetition_penalty, step=0.05, elem_id="gen-repetition",
                          label="repetition penalty (1 = off; on the reply's own tokens)")]

    def wire(self) -> None:
        page = self.page
        # The plots are drawn by an event of their own after the reply: as outputs of the streamed
        # event, chromium redrew both on every update of the reply (~0.6 s of its CPU in a 79-token
        # reply, on the cores that decode; profiled 2026-12-06).
        out = [self.chatbot, self.msg, self.notice, self.strip, self.tiers, page.header]

        def then_plots(event) -> None:
            event.then(self.reply_plots, None, [self.heat, self.load], api_name=False, show_progress="hidden")
        for trigger in (self.msg.submit, self.send.click):
            then_plots(trigger(self.chat, [self.msg, self.chatbot], out, concurrency_id="wake", show_progress="hidden",
                               api_name="chat" if trigger == self.msg.submit else False))
        self.stop.click(self.stop_reply, None, None, queue=False, api_name="stop_reply")
        then_plots(self.retry_btn.click(self.retry, [self.chatbot], out, api_name="retry", concurrency_id="wake",
                                        show_progress="hidden"))
        then_plots(self.chatbot.retry(self.retry, [self.chatbot], out, api_name=False, concurrency_id="wake",
                                      show_progress="hidden"))
        self.clear_btn.click(self.clear, None, [self.chatbot, self.notice, self.tiers], api_name="clear")
        self.chatbot.clear(self.clear, None, [self.chatbot, self.notice, self.tiers], api_name=False)
        self.fast_every.change(self.set_fast_learning, self.fast_every, [self.notice, self.tiers],
                               api_name="fast_learning")
        for i, slider in enumerate(self.generation):
            slider.release(self.set_generation, self.generation, self.notice,
                           api_name="generation" if i == 0 else False)
        self.teach_btn.click(self.teach, [self.teach_text, self.teach_file],
                             [self.teach_text, self.teach_file, self.teach_notice, self.tiers, page.header],
                             api_name="teach", show_progress_on=[self.teach_notice])

    def reply_view(self, reply) -> dict:
        """The routing of `reply` (None: no reply yet), counted into the expert usage."""
        tokens = reply.token_texts(self.engine.tokenizer) if reply else []
        view = views.routing_view(reply.trace if reply else None, tokens)
        if reply is not None and view["experts"]:
            self.page.usage.add(view)
        return view

    def routing_plots(self, view: dict) -> dict:
        return {self.heat: plots.routing_heatmap(view), self.load: plots.expert_load_bar(views.expert_load(view))}

    def routing(self, view: dict) -> dict:
        return {**self.routing_plots(view), self.strip: views.token_strip(view)}

    def reply_plots(self, request: gr.Request) -> dict:
        """The routing plots of this browser's reply that just ended (unchanged if it was refused)."""
        view = self.views.pop(self.page.sessions.key(request), None)
        return self.routing_plots(view) if view is not None else {self.heat: gr.skip(), self.load: gr.skip()}

    def chat(self, message, history, request: gr.Request):
        page, history = self.page, list(history or [])
        stop = page.stops.fresh(request.session_hash if request else "api")
        key = page.sessions.key(request)
        reply, box = None, {self.msg: ""}
        try:
            for reply in in_own_thread(lambda: self.engine.wake.stream(message, stop, session=key,
                                                                    sampling=page.sampling.get(key)), stop):
                turn = [{"role": "user", "content": message}, {"role": "assistant", "content": reply.text}]
                # the message box is emptied once, by the first update: emptied by every update, it
                # wiped a next question typed while the reply streamed
                yield {self.chatbot: history + turn, **box}   # the whole text too, before the panels
                box = {}
        except (WakeInputError, WakeBusy) as e:
            yield {self.chatbot: history, self.msg: message, self.notice: _error(str(e))}   # the message stays
            return
        turn = [{"role": "user", "content": message}, {"role": "assistant", "content": reply.text}]
        view = self.views[key] = self.reply_view(reply)   # its plots come next (`reply_plots`)
        yield {self.chatbot: history + turn, **box, self.notice: _ok(" · ".join(reply_notes(reply))),
               self.strip: views.token_strip(view), self.tiers: page.tiers_table(request), page.header: page.header_html()}

    def stop_reply(self, request: gr.Request):
        self.page.stops.stop(request.session_hash if request else "api")

    def retry(self, history, request: gr.Request):
        key = self.page.sessions.key(request)
        message = self.engine.wake.drop_last_turn(key)
        if message is None:   # only this session's own last turn can be retried
            yield {self.chatbot: list(history or []), self.notice: _error("nothing to retry")}
            return
        yield from self.chat(message, self.engine.wake.conversation(key), request)

    def clear(self, request: gr.Request):
        self.engine.wake.clear(self.page.sessions.key(request))
        return {self.chatbot: [], self.notice: _ok("conversation cleared (its turns stay in the episode log)"),
                self.tiers: self.page.tiers_table(request)}

    def set_generation(self, max_new_tokens, temperature, top_p, repetition_penalty, request: gr.Request):
        """This browser's sampling settings, checked like the config, kept for its later replies."""
        values = dict(zip(SAMPLING_FIELDS, (int(max_new_tokens), temperature, top_p, repetition_penalty)))
        try:
            self.engine.wake.sampling(values)
        except WakeInputError as e:
            return _error(str(e))
        self.page.sampling[self.page.sessions.key(request)] = values
        return _ok("generation: " + ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in values.items()))

    def set_fast_learning(self, every, request: gr.Request):
        try:
            self.engine.set_fast_learning(every)
        except (ConfigError, TypeError, ValueError) as e:
            return {self.notice: _error(str(e))}
        state = "off" if not every else f"every {int(every)} turns and after each taught text"
        return {self.notice: _ok(f"test-time learning {state}"), self.tiers: self.page.tiers_table(request)}

    def teach(self, text, upload, request: gr.Request):
        page = self.page
        try:
            if upload:
                body, source = read_upload(upload)
            elif text and text.strip():
                body, source = text, "pasted"
            else:
                raise WakeInputError("paste a text or choose a text file to teach")
            ep = self.engine.wake.teach(body, source=source)
        except (WakeInputError, WakeBusy, OSError) as e:
            return {self.teach_file: None, self.teach_notice: _error(str(e))}   # a refused file is unselected
        note = teach_note(ep, source, body, page.asleep(), self.engine.wake.learning())
        return {**({self.teach_text: ""} if not upload else {}), self.teach_file: None,
                self.teach_notice: _ok(note), self.tiers: page.tiers_table(request), page.header: page.header_html()}


class SleepTab:
    """Settings, the episodes the next sleep takes, Sleep now / Stop, and the live panels."""

    def __init__(self, page: Page):
        self.page, self.engine = page, page.engine
        with gr.Row():
            self.preset = gr.Dropdown(list(SleepConfig.PRESETS), value="quick", label="preset", scale=1)
            self.fields = [gr.Number(value=v, label=label, elem_id=f"set-{key}")
                           for (key, label), v in zip(SETTINGS, self.preset_values("quick"))]
        with gr.Accordion("More settings", open=False):
            self.more = gr.Textbox(label="any other sleep setting, one key=value per line (as with the "
                                         "CLI's --set), e.g. dreaming=false or answer_tokens=48",
                                   lines=3, elem_id="more-settings")
        with gr.Accordion("Episodes: what the next sleep consolidates", open=False, elem_id="episodes"):
            self.episodes_df = gr.Dataframe(headers=views.EPISODE_COLUMNS, interactive=False, wrap=True,
                                            max_height=320, elem_id="episodes-table",
                                            column_widths=["5%", "7%", "12%", "9%", "13%", "18%", "36%"])
            with gr.Row():
                self.episode_ids = gr.Textbox(label="episode ids, e.g. 3 or 5-7", scale=2, elem_id="episode-ids")
                self.leave_out_btn = gr.Button("Leave out", scale=0, elem_id="episodes-leave-out")
                self.take_in_btn = gr.Button("Take back in", scale=0, elem_id="episodes-take-in")
                self.delete_btn = gr.Button("Delete", variant="stop", scale=0, elem_id="episodes-delete")
            self.episodes_notice = gr.HTML(elem_id="episodes-notice")
        with gr.Row():
            self.sleep_btn = gr.Button("Sleep now", variant="primary", elem_id="sleep-now")
            self.stop_sleep_btn = gr.Button("Stop (roll back)", variant="stop", elem_id="stop-sleep")
        self.sleep_notice = gr.HTML(elem_id="sleep-notice")
        self.progress = gr.HTML(elem_id="progress")
        self.notes = gr.HTML(elem_id="sleep-notes")   # what the running (or last) sleep said on the way
        self.live_panels()

    def live_panels(self) -> None:
        with gr.Row():
            self.cons_plot = gr.Plot(label="Consolidation", elem_id="panel-consolidation")
            self.dream_plot = gr.Plot(label="Dreams", elem_id="panel-dreams")
        self.samples = gr.Dataframe(headers=views.SAMPLE_COLUMNS, label="Consolidation samples (LTI)",
                                    interactive=False, wrap=True, max_height=300, elem_id="panel-samples",
                                    column_widths=["6%", "24%", "24%", "25%", "7%", "7%", "7%"])
        self.dream_df = gr.Dataframe(headers=views.DREAM_COLUMNS, label="Dreams", interactive=False, wrap=True,
                                     max_height=300, elem_id="panel-dream-table", column_widths=DREAM_WIDTHS)
        self.forget_plot = gr.Plot(label="Forgetting", elem_id="panel-forgetting")
        self.locality_df = gr.Dataframe(headers=views.LOCALITY_COLUMNS, interactive=False, wrap=True,
                                        label="Locality: each expert's mean gate after the last sleep (it should "
                                              "open on its own episodes' questions only)", elem_id="panel-locality")
        self.growth_plot = gr.Plot(label="Expert growth", elem_id="panel-growth")

    def wire(self) -> None:
        self.preset.change(self.preset_values, self.preset, self.fields, api_name=False)
        self.sleep_btn.click(self.start_sleep, [self.preset] + self.fields + [self.more], self.sleep_notice,
                             api_name="sleep").then(self.page.pace, None, self.page.timer, api_name=False)
        self.stop_sleep_btn.click(self.stop_sleep, None, self.sleep_notice, api_name="stop_sleep",
                                  concurrency_limit=None)
        out = [self.episodes_notice, self.episodes_df, self.episode_ids]
        for button, action, api in ((self.leave_out_btn, "leave out", "leave_out"),
                                    (self.take_in_btn, "take in", "take_in"),
                                    (self.delete_btn, "delete", "delete_episodes")):
            button.click(functools.partial(self.change_episodes, action), self.episode_ids, out, api_name=api)

    @staticmethod
    def preset_values(name):
        cfg = SleepConfig.from_preset(name)
        return [getattr(cfg, key) for key, _ in SETTINGS]

    def start_sleep(self, preset, *values):
        *values, more = values
        try:
            settings = sleep_settings(preset, values, more)
            number = self.engine.sleep(settings)
        except (ConfigError, NothingToConsolidate, RuntimeError, ValueError) as e:
            return _error(str(e))
        taken = ", ".join(str(i) for i in self.engine.status().get("episodes", []))
        budget = f", within {settings.budget_s:g} s" if settings.budget_s else ", no time budget"
        return _ok(f"Sleep {number} started ({preset} preset{budget}) on episode(s) {taken}. You can keep chatting: replies "
                   "come from the memory as it was before the sleep. Stop rolls the sleep back.")

    def change_episodes(self, action, text):
        """Leave out, take back in or delete pending episodes; the table shows the result."""
        try:
            ids = views.parse_ids(text)
            if action == "delete":
                done, verb = self.engine.delete_episodes(ids), "deleted for good"
            else:
                done = self.engine.exclude_episodes(ids, excluded=action == "leave out")
                verb = "left out of the next sleep" if action == "leave out" else "back in for the next sleep"
        except (ValueError, RuntimeError) as e:
            return {self.episodes_notice: _error(str(e))}
        pending = [e.id for e in self.engine.pending_episodes()]
        return {self.episodes_notice: _ok(f"episode(s) {', '.join(map(str, done))} {verb}; the next sleep takes "
                                          + (", ".join(map(str, pending)) if pending else "nothing")),
                self.episodes_df: views.episode_table(self.engine.episode_rows()), self.episode_ids: ""}

    def stop_sleep(self):
        if self.engine.cancel():
            return _ok("Stopped: the model was rolled back to its pre-sleep state, bit for bit.")
        return _error("no sleep is running")

    def panels(self) -> dict:
        engine = self.engine
        events = engine.events.since(0)
        dirs = engine.state.sleep_dirs()
        if not events and dirs:   # a fresh server: show the last completed sleep from its log on disk
            events = views.read_events(dirs[-1] / "events.jsonl")
        status = engine.status()
        manifests = engine.state.sleep_manifests()
        running = ({"sleep": status.get("sleep"), "experts": views.live_experts(events)}
                   if status.get("state") == "sleeping" else None)
        dreams = views.dream_rows(events)
        notes = views.sleep_notices(events)
        return {self.notes: _ok("Notices: " + " · ".join(notes)) if notes else "", self.cons_plot: plots.consolidation_fig(views.loss_series(events)),
                self.samples: views.sample_rows(events), self.dream_plot: plots.dreams_scatter(dreams),
                self.dream_df: views.dream_table(dreams),
                self.forget_plot: plots.forgetting_fig(views.forgetting_view(engine.accuracy_matrix(), manifests)),
                self.growth_plot: plots.growth_fig(views.growth(manifests, running)),
                self.locality_df: views.locality_table(manifests[-1] if manifests else None)}


class InspectTab:
    """A past sleep: its summary, dreams, experts and probes, downloads, undo, the same question
    before and after it, export, and the lab reports."""

    def __init__(self, page: Page):
        self.page, self.engine = page, page.engine
        with gr.Row():
            self.pick = gr.Dropdown(choices=[], label="past sleep", elem_id="inspect-pick", scale=2,
                                    allow_custom_value=True)   # choices arrive with the timer; handlers check the name
            self.refresh = gr.Button("Refresh", scale=0)
            self.undo_btn = gr.Button("Undo last sleep", variant="stop", scale=0, elem_id="undo-sleep")
            self.ev_dl = gr.DownloadButton("Event log (JSON lines)", elem_id="dl-events", scale=1)
            self.csv_dl = gr.DownloadButton("Accuracy matrix (CSV)", elem_id="dl-matrix", scale=1)
        self.notice = gr.HTML(elem_id="inspect-notice")
        self.summary = gr.Dataframe(headers=["what", "value"], label="Summary", interactive=False, wrap=True)
        self.dreams = gr.Dataframe(headers=views.DREAM_COLUMNS, label="Dreams", interactive=False,
                                   wrap=True, max_height=300, column_widths=DREAM_WIDTHS)
        self.experts = gr.Dataframe(headers=["expert", "tier", "its episodes", "rank", "layers", "parameters",
                                             "tokens seen", "mean gate", "tokens where its gate led"],
                                    label="Experts added (usage over the replies this server has seen)",
                                    interactive=False)
        self.probes = gr.Dataframe(headers=["episode", "episode of", "accuracy before", "accuracy after"],
                                   label="Probe results (closed-book)", interactive=False)
        self.before_after_panel()
        with gr.Accordion("Export the model (launch.py export)", open=False, elem_id="export"):
            with gr.Row():
                self.export_name = gr.Textbox(value=lambda: time.strftime("slept-%Y%m%d-%H%M"), scale=3,
                                              label=f"folder name, under {page.exports_dir}", elem_id="export-name")
                self.export_btn = gr.Button("Export", scale=0, elem_id="export-btn")
            self.export_notice = gr.HTML(elem_id="export-notice")
        self.reports = ReportsPanel(page)

    def before_after_panel(self) -> None:
        with gr.Accordion("Before and after the selected sleep: one question, both memories",
                          open=False, elem_id="before-after"):
            with gr.Row():
                self.ba_question = gr.Textbox(label="question", scale=4, elem_id="ba-question",
                                              placeholder="e.g. Where is Velmora Ridge?")
                self.ba_btn = gr.Button("Ask both", scale=0, elem_id="ba-ask")
            with gr.Row():
                self.ba_before = gr.Textbox(label="memory before the sleep", interactive=False, elem_id="ba-before")
                self.ba_after = gr.Textbox(label="memory after the sleep", interactive=False, elem_id="ba-after")
            self.ba_notice = gr.HTML(elem_id="ba-notice")

    def wire(self) -> None:
        page = self.page
        out = [self.summary, self.dreams, self.experts, self.probes, self.ev_dl, self.csv_dl, self.notice]
        self.pick.change(self.inspect, self.pick, out, api_name=False)
        self.refresh.click(lambda: gr.update(choices=page.sleep_choices()), None, self.pick, api_name=False)
        self.refresh.click(self.inspect, self.pick, out, api_name=False)
        self.undo_btn.click(self.undo_sleep, None, [self.pick, self.notice, page.wake.tiers, page.header],
                            api_name="undo_sleep")
        self.export_btn.click(self.export_model, self.export_name, self.export_notice, api_name="export",
                              concurrency_id="wake")
        self.ba_btn.click(self.before_after, [self.pick, self.ba_question], [self.ba_before, self.ba_after,
                                                                            self.ba_notice], api_name="before_after")
        self.reports.wire()

    def inspect(self, name):
        dirs = {d.name: d for d in self.engine.state.sleep_dirs()}
        empty = {self.summary: [], self.dreams: [], self.experts: [], self.probes: [], self.ev_dl: None,
                 self.csv_dl: None}
        if not name or name not in dirs:
            return {**empty, self.notice: _ok("No sleep selected." if dirs else "No completed sleep yet.")}
        d = dirs[name]
        try:
            manifest = json.loads((d / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            return {**empty, self.notice: _error(f"sleep {name} is unreadable: {e}")}
        events = views.read_events(d / "events.jsonl")
        ev_copy = self.page.download_dir / f"sleep-{name}-events.jsonl"
        if (d / "events.jsonl").exists():
            shutil.copyfile(d / "events.jsonl", ev_copy)
        csv_copy = self.page.download_dir / "accuracy-matrix.csv"
        csv_copy.write_text(views.matrix_csv(self.engine.accuracy_matrix()))
        notes = [("notices", " · ".join(n)) for n in [views.sleep_notices(events)] if n]
        return {self.summary: views.sleep_summary(manifest) + notes, self.dreams: views.dream_table(views.dream_rows(events)),
                self.experts: views.expert_rows(manifest, self.page.usage), self.probes: views.probe_rows(manifest),
                self.ev_dl: str(ev_copy) if ev_copy.exists() else None, self.csv_dl: str(csv_copy),
                self.notice: _ok(f"sleep {name}: {len(events)} events")}

    def undo_sleep(self, request: gr.Request):
        page = self.page
        try:
            result = self.engine.undo_sleep()
        except RuntimeError as e:
            return {self.notice: _error(str(e))}
        choices = page.sleep_choices()
        return {self.pick: gr.update(choices=choices, value=choices[-1] if choices else None),
                self.notice: _ok(f"Sleep {result['undone']} undone: its experts are gone and its "
                                 f"{len(result['pending'])} episode(s) are pending again; the memory is the one it "
                                 "started from."),
                page.wake.tiers: page.tiers_table(request), page.header: page.header_html()}

    def before_after(self, name, question):
        """The selected sleep's memory before and after it, answering the same question."""
        if not name:
            return {self.ba_notice: _error("pick a past sleep first")}
        try:
            got = self.engine.before_after(int(name), question)
        except (ValueError, WakeInputError) as e:
            return {self.ba_notice: _error(str(e))}
        return {self.ba_before: got["before"], self.ba_after: got["after"],
                self.ba_notice: _ok(f"sleep {got['sleep']}: experts {', '.join(got['before_experts']) or 'none'} "
                                    f"before, {', '.join(got['after_experts'])} after; greedy, fast weights off")}

    def export_model(self, name):
        """Write the current model (base + memory + model card) under the exports folder."""
        name = (name or "").strip()
        if not EXPORT_NAME.fullmatch(name):
            return _error("Give the export a name of letters, digits, '.', '_' or '-' (no folders).")
        try:
            result = export(self.engine, self.page.exports_dir / name)
        except ExportError as e:
            return _error(str(e))
        return _ok(f"Exported {result['experts']} expert(s) and {result['sleeps']} sleep(s) to {result['out']} "
                   f"({result['bytes'] / 1e6:.0f} MB). Open it with: python launch.py --model {result['out']} "
                   "--state-dir NEW_DIR, or in Python with sleep_engine.load_pretrained.")


class ReportsPanel:
    """The lab reports written by `launch.py lab` (Inspect's last accordion): table, figures, HTML."""

    def __init__(self, page: Page):
        self.page, self.folder = page, page.reports_dir
        self.loaded: dict = {}   # path → (mtime, load_report's view): picking a figure re-reads nothing
        with gr.Accordion("Lab reports (python launch.py lab …)", open=False, elem_id="lab-reports"):
            with gr.Row():
                self.pick = gr.Dropdown(choices=[], label="report", elem_id="report-pick", scale=3,
                                        allow_custom_value=True)   # choices arrive on page load
                self.refresh = gr.Button("Refresh", scale=0)
                self.download = gr.DownloadButton("Full report (HTML)", elem_id="dl-report", scale=1)
            self.notice = gr.HTML(elem_id="report-notice")
            self.table = gr.Markdown(elem_id="report-table")
            self.figure_pick = gr.Dropdown(choices=[], label="figure", elem_id="report-figure-pick",
                                           allow_custom_value=True)
            self.figure = gr.Plot(label="Figure", elem_id="report-figure")

    def wire(self) -> None:
        out = [self.table, self.figure_pick, self.figure, self.download, self.notice]
        self.pick.change(self.open, self.pick, out, api_name="lab_report")
        self.refresh.click(lambda: gr.update(choices=self.choices()), None, self.pick, api_name=False)
        self.figure_pick.change(self.show_figure, [self.pick, self.figure_pick], self.figure, api_name=False)

    def choices(self):
        return [(f"{Path(r['json']).parent.name}/{r['experiment']} · {r['preset']} · {r['date']}", r["json"])
                for r in list_reports(self.folder)]

    def view(self, path: str) -> dict:
        """The report at `path`, which must be a JSON file inside the reports folder (ValueError)."""
        file = Path(path).resolve()
        if file.suffix != ".json" or not file.is_file() or not file.is_relative_to(self.folder.resolve()):
            raise ValueError(f"no lab report {path!r} in {self.folder}")
        mtime = file.stat().st_mtime
        if self.loaded.get(file, (None,))[0] != mtime:
            self.loaded[file] = (mtime, load_report(file))
        return self.loaded[file][1]

    def open(self, path):
        nothing = {self.table: "", self.figure_pick: gr.update(choices=[], value=None), self.figure: None,
                   self.download: None}
        if not path:
            message = ("No lab report selected." if self.choices() else
                       f"No lab reports in {self.folder} yet: run `python launch.py lab knowledge --quick`.")
            return {**nothing, self.notice: _ok(message)}
        try:
            view = self.view(path)
        except ValueError as e:
            return {**nothing, self.notice: _error(str(e))}
        titles = [f.layout.title.text for f in view["figures"]]
        html_copy = None
        if view["html"]:   # served from the export folder: the reports folder may be anywhere
            html_copy = self.page.download_dir / f"lab-{Path(path).stem}.html"
            shutil.copyfile(view["html"], html_copy)
        return {self.table: view["table"], self.figure_pick: gr.update(choices=titles, value=titles[0] if titles else None),
                self.figure: view["figures"][0] if titles else None,
                self.download: str(html_copy) if html_copy else None,
                self.notice: _ok(f"{view['result']['experiment']} experiment of {view['result'].get('date', '?')}")}

    def show_figure(self, path, title):
        try:
            figs = self.view(path)["figures"] if path else []
        except ValueError:
            return None
        return next((f for f in figs if f.layout.title.text == title), None)


def build_app(engine, reports_dir: str | Path = "reports") -> gr.Blocks:
    """The page as it reads: a header, the Wake, Sleep and Inspect tabs (one builder each), then
    what spans them: the timer that redraws the live panels and the page load that
    re-attaches a browser to its own conversation."""
    page = Page(engine, reports_dir)
    with gr.Blocks(title="Sleep Lab", analytics_enabled=False) as demo:
        gr.Markdown("## Sleep Lab")
        page.header = gr.HTML(elem_id="header")
        page.browser = gr.BrowserState(None, storage_key="sleep-lab-conversation")   # this browser's conversation id
        guide_dismissed = gr.BrowserState(False, storage_key="sleep-lab-guide-dismissed")
        page.panel_key = gr.State(None)   # what the panels last showed (tick redraws on change)
        page.timer = gr.Timer(AWAKE_TICK_S)
        with gr.Tabs():
            with gr.Tab("Wake", id="wake"):
                page.wake = WakeTab(page)
            with gr.Tab("Sleep", id="sleep"):
                page.sleep = SleepTab(page)
            with gr.Tab("Inspect", id="inspect"):
                page.inspect = InspectTab(page)
        for tab in (page.wake, page.sleep, page.inspect):
            tab.wire()
        gr.api(page.status_api, api_name="status")
        page.timer.tick(page.tick, page.panel_key, page.live(), show_progress="hidden", concurrency_limit=None,
                   api_name=False)
        guide = page.wake.guide
        page.wake.guide_ok.click(lambda: (True, gr.update(visible=False)), None, [guide_dismissed, guide],
                                 api_name=False)
        demo.load(lambda dismissed: gr.update(visible=not dismissed), guide_dismissed, guide, api_name=False)
        demo.load(page.on_load, page.browser, page.load_outputs(), api_name=False, show_progress="hidden")
    return demo


def launch(engine, host: str = "127.0.0.1", port: int | None = None, auth: tuple[str, str] | None = None,
           share: bool = False, block: bool = True, reports_dir: str | Path = "reports") -> gr.Blocks:
    """Start the page. Safe defaults: loopback only, no share link, no run history or monitoring."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_app(engine, reports_dir)
    demo.queue(default_concurrency_limit=1)
    demo._queue.sleep_when_free = QUEUE_POLL_S   # private to Gradio: tests/test_app.py checks it is still read
    demo.launch(server_name=host, server_port=port, auth=make_auth(auth), share=share, max_file_size=UPLOAD_LIMIT,
                enable_monitoring=False, run_history=False, ssr_mode=False, show_error=True,
                prevent_thread_lock=not block, css=CSS, js=KEEP_ZOOM_JS, quiet=not block, footer_links=["api", "settings"])
    return demo
