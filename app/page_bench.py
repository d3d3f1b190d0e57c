"""`bench wake`'s Wake-tab row: what a reply streamed through the web app delivers.

The same engine answers each bench prompt twice, side by side: once directly (`wake.stream`, no
UI) and once through the page, in a process of its own as a browser is: the page itself in
headless chromium where Playwright and chromium are installed (the text timed as it appears in
the chat, by a MutationObserver), else gradio's Python client on the page's `/chat` endpoint.
Both are timed alike: first text, and tokens / seconds from sending to the whole text (the
bench's own definition); the page's status line ("N tokens, first after X ms, Y tokens/s": its
decode rate) is kept too. Replies stop at the end of the answer as in the app, so they are
shorter than the bench's fixed 64 tokens. On two cores the browser's own CPU is part of what the
page costs: the engine's timings run with the page open (and idle) in the same browser.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STATUS = re.compile(r"(\d+) tokens, first after (\d+) ms, ([\d.]+) tokens/s")
CHROMIUM = os.environ.get("SLEEP_LAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# Records each new content of the last assistant message (its HTML: a random-weight model's text
# may render as nothing visible), with the page's clock, from the Enter that sends the message
# (a capturing listener: it runs before the page's own), and when the routing plots last changed.
WATCH_REPLY = """() => {
  const rec = window.__reply = {t0: null, arrivals: []};
  const box = document.getElementById('chatbot');
  rec.observer = new MutationObserver(() => {
    const bots = box.querySelectorAll('[data-testid="bot"]');
    const html = bots.length ? bots[bots.length - 1].innerHTML : null;
    const last = rec.arrivals[rec.arrivals.length - 1];
    if (rec.t0 !== null && html !== null && (!last || last[1] !== html)) rec.arrivals.push([performance.now(), html]);
  });
  rec.observer.observe(box, {childList: true, subtree: true, characterData: true});
  rec.plots = new MutationObserver(() => { if (rec.t0 !== null) rec.plotted = performance.now(); });
  for (const id of ['routing-heatmap', 'expert-load'])
    rec.plots.observe(document.getElementById(id), {childList: true, subtree: true, attributes: true});
  document.querySelector('#message textarea').addEventListener(
    'keydown', e => { if (e.key === 'Enter') rec.t0 = performance.now(); }, {capture: true, once: true});
}"""


PLOTS_DRAWN_MS = 300   # the routing plots unchanged this long: drawn (Plotly redraws in one go)
SETTLE_S = 1.0   # after a reply through the page, before the engine's next timing: the server's and
                 # the browser's work on that reply's last update is over, as before a person's next message


def browser_available() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return shutil.which(CHROMIUM) is not None


def _direct(engine, prompt: str) -> dict:
    """One reply straight from the engine, timed like the page: first token, whole text."""
    t0 = time.perf_counter()
    first = last = None
    for reply in engine.wake.stream(prompt, threading.Event(), session="bench-direct"):
        if not reply.done:
            first, last = first or time.perf_counter(), time.perf_counter()
    done = time.perf_counter()
    engine.wake.clear("bench-direct")
    return {"tokens": len(reply.token_ids), "ttft_s": first - t0,
            "tokens_per_s": len(reply.token_ids) / (last - t0), "logged_after_s": done - last,
            "status_tokens_per_s": reply.tokens_per_s}   # the decode rate the page's status line would show


def _through_page(client, prompt: str) -> dict:
    """One reply through the page's `/chat` endpoint, timed where the page would show it: the
    first text, the whole text, and the last update (the routing panels come with it)."""
    client.predict(api_name="/clear")
    t0 = time.perf_counter()
    arrivals = []   # (time, assistant text so far)
    job = client.submit(prompt, [], api_name="/chat")
    for history, *_ in job:            # each streamed update, as it arrives
        if history and history[-1].get("role") == "assistant":
            arrivals.append((time.perf_counter(), str(history[-1]["content"])))
    notice = job.outputs()[-1][2]
    m = STATUS.search(notice or "")
    if m is None or not arrivals:
        raise RuntimeError(f"the page did not report a reply: {notice!r}")
    tokens, first, panels = int(m.group(1)), arrivals[0][0], arrivals[-1][0]
    text_done = next(t for t, text in arrivals if text == arrivals[-1][1])
    return {"tokens": tokens, "updates": len(arrivals), "ttft_s": first - t0,
            "tokens_per_s": tokens / (text_done - t0), "panels_after_text_s": panels - text_done,
            "status_ttft_s": int(m.group(2)) / 1000, "status_tokens_per_s": float(m.group(3))}


def _in_browser(page, prompt: str) -> dict:
    """One reply typed into the page, timed by the page's clock as the text appears."""
    page.locator("#clear").click()
    page.wait_for_function("() => !document.getElementById('wake-notice').innerText.includes('tokens/s')")
    page.evaluate(WATCH_REPLY)
    page.locator("#message textarea").fill(prompt)
    page.locator("#message textarea").press("Enter")
    page.wait_for_function("() => document.getElementById('wake-notice').innerText.includes('tokens/s')",
                           timeout=120_000)
    # the routing plots come after the reply: the engine's next timing starts once the page has
    # drawn them (unchanged for PLOTS_DRAWN_MS), as a person's next message would
    page.wait_for_function(f"() => window.__reply.plotted && performance.now() - window.__reply.plotted > {PLOTS_DRAWN_MS}",
                           timeout=30_000)
    rec = page.evaluate("() => { window.__reply.observer.disconnect(); window.__reply.plots.disconnect(); "
                        "return {t0: window.__reply.t0, arrivals: window.__reply.arrivals}; }")
    page.evaluate("() => new Promise(done => requestIdleCallback(done, {timeout: 5000}))")
    m = STATUS.search(page.locator("#wake-notice").inner_text())
    arrivals = rec["arrivals"]
    if m is None or not arrivals:
        raise RuntimeError("the page did not show a reply")
    tokens, t0 = int(m.group(1)), rec["t0"]
    text_done = next(t for t, text in arrivals if text == arrivals[-1][1])
    return {"tokens": tokens, "updates": len(arrivals), "ttft_s": (arrivals[0][0] - t0) / 1000,
            "tokens_per_s": tokens / ((text_done - t0) / 1000),
            "status_ttft_s": int(m.group(2)) / 1000, "status_tokens_per_s": float(m.group(3))}


def _browser_main(url: str, prompts: list[str], repeats: int = 1) -> None:
    """The browser's process: the page as a user has it, a warm-up reply, then one JSON line per
    prompt."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("() => (document.getElementById('header') || {}).innerText")
        if page.locator("#guide-ok").is_visible():
            page.locator("#guide-ok").click()
        _serve(lambda prompt: _in_browser(page, prompt), prompts, repeats)
        browser.close()


def _client_main(url: str, prompts: list[str], repeats: int = 1) -> None:
    """The Python client's process (no browser installed)."""
    from gradio_client import Client
    client = Client(url, verbose=False)
    _serve(lambda prompt: _through_page(client, prompt), prompts, repeats)


def _serve(reply, prompts: list[str], repeats: int) -> None:
    """A warm-up reply (the first request sets the page up), then, at each line on stdin, one
    timed reply as a JSON line."""
    reply(prompts[0])
    print("ready", flush=True)
    for prompt in prompts * repeats:
        sys.stdin.readline()             # the engine's own reply to this prompt comes first
        cpu = time.process_time()
        row = reply(prompt)
        print(json.dumps({**row, "client_cpu_s": time.process_time() - cpu}), flush=True)


# Rounds of the bench prompts. The page / engine ratio spread 0.68–0.92 over runs of the same
# code with three rounds (and 0.70, 0.84 with five; 2026-12-06): more samples per run, ~10 s each.
ROUNDS = 5


def wake_tab_rate(engine, prompts: list[str], repeats: int = ROUNDS, log=print, client: str | None = None) -> dict:
    """The Wake tab's row of `bench wake` (medians over `prompts`), with the engine's own rate on
    the same prompts in the same run and the page / engine ratio. The client ("browser", or
    "gradio_client"; by default the browser where installed) runs in a process of its own, as a
    browser does (not in the server's interpreter). Switches the engine's tier-1 updates off:
    meant for a scratch engine (`launch.py bench wake`)."""
    client = client or ("browser" if browser_available() else "gradio_client")
    main = {"browser": "_browser_main", "gradio_client": "_client_main"}[client]
    from .ui import STREAM_INTERVAL_S, launch
    engine.cfg.wake.fast_update_every = 0   # a background tier-1 update would hold the next reply
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as reports:
        demo = launch(engine, port=None, block=False, reports_dir=reports)   # gradio finds a free port from 7860
        code = f"from app.page_bench import {main}; {main}({demo.local_url!r}, {list(prompts)!r}, {repeats})"
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            if proc.stdout.readline().strip() != "ready":   # its warm-up must not overlap a timing
                raise RuntimeError("the page client did not start (see its error above)")
            direct, page = [], []
            for prompt in prompts * repeats:   # side by side, prompt by prompt
                direct.append(_direct(engine, prompt))
                proc.stdin.write("go\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError("the page client stopped (see its error above)")
                page.append(json.loads(line))
                time.sleep(SETTLE_S)
        finally:
            proc.kill()
            with contextlib.redirect_stdout(sys.stderr):   # gradio says "Closing server …": --json's stdout stays JSON
                demo.close()

    def median(rows, key, scale=1.0):   # None where this client does not time it
        return round(scale * statistics.median(r[key] for r in rows), 1) if key in rows[0] else None
    row = {"engine_tokens_per_s": median(direct, "tokens_per_s"), "engine_ttft_ms": median(direct, "ttft_s", 1000),
           "page_tokens_per_s": median(page, "tokens_per_s"), "page_ttft_ms": median(page, "ttft_s", 1000),
           "status_tokens_per_s": median(page, "status_tokens_per_s"),
           "engine_status_tokens_per_s": median(direct, "status_tokens_per_s"),
           "panels_after_text_ms": median(page, "panels_after_text_s", 1000),
           "stream_interval_s": STREAM_INTERVAL_S, "repeats": repeats, "client": client,
           "per_prompt": [{"page": p, "engine": d} for p, d in zip(page, direct)]}
    row["page_vs_engine"] = round(row["page_tokens_per_s"] / row["engine_tokens_per_s"], 3)
    row["status_vs_engine"] = round(row["status_tokens_per_s"] / row["engine_status_tokens_per_s"], 3)   # decode rates
    # the same ratios per reply (page and engine on one prompt, one after the other), with the
    # interval of their median: run to run, the ratio of medians moved more than the target's margin
    from sleep_engine.lab.scoring import median_interval   # not at import: the client's process needs no torch
    per_reply = []
    for name, key in (("page_vs_engine", "tokens_per_s"), ("status_vs_engine", "status_tokens_per_s")):
        ratios = [p[key] / d[key] for p, d in zip(page, direct)]
        low, high, coverage = median_interval(ratios)
        r = row[f"{name}_per_reply"] = {"median": round(statistics.median(ratios), 3), "low": round(low, 3),
                                        "high": round(high, 3), "coverage": round(coverage, 3)}
        per_reply.append(f"{name.split('_')[0]} {r['median']} ({r['low']}–{r['high']}, {r['coverage']:.0%})")
    log(f"Wake tab ({client}): {row['page_tokens_per_s']} tokens/s at the client, first text after {row['page_ttft_ms']} ms "
        f"(engine alone {row['engine_tokens_per_s']} tokens/s, {row['engine_ttft_ms']} ms); decoding, by the status "
        f"line {row['status_tokens_per_s']} against {row['engine_status_tokens_per_s']} tokens/s; page / engine per "
        f"reply {', '.join(per_reply)}")
    return row
