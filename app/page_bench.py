"""`bench wake`'s Wake-tab row: what a reply streamed through the web app delivers.

The same engine answers each bench prompt twice, side by side: once directly (`wake.stream`, no
UI) and once through the page's own `/chat` endpoint over HTTP, as the browser sends it (gradio's
client, streaming, in a process of its own as a browser is). Both are timed alike: first text,
and tokens / seconds from sending to the whole text (the bench's own definition); the page's
status line ("N tokens, first after X ms, Y tokens/s": its decode rate) is kept too. Replies stop
at the end of the answer as in the app, so they are shorter than the bench's fixed 64 tokens.
"""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STATUS = re.compile(r"(\d+) tokens, first after (\d+) ms, ([\d.]+) tokens/s")


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
            "tokens_per_s": len(reply.token_ids) / (last - t0), "logged_after_s": done - last}


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


def _client_main(url: str, prompts: list[str], repeats: int = 1) -> None:
    """The client's process: a warm-up reply, then one JSON line per prompt."""
    from gradio_client import Client
    client = Client(url, verbose=False)
    _through_page(client, prompts[0])   # the first request sets the page up
    print("ready", flush=True)
    for prompt in prompts * repeats:
        sys.stdin.readline()             # the engine's own reply to this prompt comes first
        cpu = time.process_time()
        row = _through_page(client, prompt)
        print(json.dumps({**row, "client_cpu_s": time.process_time() - cpu}), flush=True)


def wake_tab_rate(engine, prompts: list[str], repeats: int = 3, log=print) -> dict:
    """The Wake tab's row of `bench wake` (medians over `prompts`), with the engine's own rate on
    the same prompts in the same run and the page / engine ratio. The client runs in a process of
    its own, as a browser does (not in the server's interpreter). Switches the engine's tier-1
    updates off: meant for a scratch engine (`launch.py bench wake`)."""
    from .ui import STREAM_INTERVAL_S, launch
    engine.cfg.wake.fast_update_every = 0   # a background tier-1 update would hold the next reply
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as reports:
        demo = launch(engine, port=None, block=False, reports_dir=reports)   # gradio finds a free port from 7860
        code = f"from app.page_bench import _client_main; _client_main({demo.local_url!r}, {list(prompts)!r}, {repeats})"
        client = subprocess.Popen([sys.executable, "-c", code], cwd=root, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            if client.stdout.readline().strip() != "ready":   # its warm-up must not overlap a timing
                raise RuntimeError("the page client did not start (see its error above)")
            direct, page = [], []
            for prompt in prompts * repeats:   # side by side, prompt by prompt
                direct.append(_direct(engine, prompt))
                client.stdin.write("go\n")
                client.stdin.flush()
                line = client.stdout.readline()
                if not line:
                    raise RuntimeError("the page client stopped (see its error above)")
                page.append(json.loads(line))
        finally:
            client.kill()
            demo.close()

    def median(rows, key, scale=1.0):
        return round(scale * statistics.median(r[key] for r in rows), 1)
    row = {"engine_tokens_per_s": median(direct, "tokens_per_s"), "engine_ttft_ms": median(direct, "ttft_s", 1000),
           "page_tokens_per_s": median(page, "tokens_per_s"), "page_ttft_ms": median(page, "ttft_s", 1000),
           "status_tokens_per_s": median(page, "status_tokens_per_s"),
           "panels_after_text_ms": median(page, "panels_after_text_s", 1000),
           "stream_interval_s": STREAM_INTERVAL_S, "repeats": repeats,
           "per_prompt": [{"page": p, "engine": d} for p, d in zip(page, direct)]}
    row["page_vs_engine"] = round(row["page_tokens_per_s"] / row["engine_tokens_per_s"], 3)
    log(f"Wake tab: {row['page_tokens_per_s']} tokens/s at the client, first text after {row['page_ttft_ms']} ms "
        f"(engine alone {row['engine_tokens_per_s']} tokens/s, {row['engine_ttft_ms']} ms)")
    return row
