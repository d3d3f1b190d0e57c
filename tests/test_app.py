"""The lab page through its HTTP API (gradio_client), on a tiny random-weight engine."""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import plotly.graph_objects as go
import pytest
import torch
from conftest import ROOT
from gradio_client import Client, handle_file
from lab_app import FAST, MORE, PASSAGE, QA, lab_fixture, wait_for  # noqa: F401 - the `lab` fixture

from app import ui
from sleep_engine.config import ConfigError

SETTINGS = [FAST[k] for k, _ in ui.SETTINGS] + [MORE]


def memory_tensors(engine):
    return {k: v.clone() for k, v in engine.memory.memory_state()[0].items()}

# gradio_client's value for an output that the event's last update left as it was (the chat's
# message box: emptied by the reply's first update, then left to what is typed meanwhile)
UNCHANGED = {"__type__": "update"}


def test_chat_streams_a_reply_and_bad_input_changes_nothing(lab):
    engine, url = lab
    client = Client(url, verbose=False)
    job = client.submit("Hello there", [], api_name="/chat")
    history, box, notice, *_ = job.result(timeout=60)
    assert len(job.outputs()) >= 3          # partial replies streamed before the final one
    # the first update empties the message box; later ones leave it to what is typed meanwhile
    assert job.outputs()[0][1] == "" and all(out[1] == UNCHANGED for out in job.outputs()[1:])
    assert [m["role"] for m in history] == ["user", "assistant"] and box == UNCHANGED
    assert "tokens/s" in notice and len(engine.state.episodes) == 1
    (own,) = [c for c in engine.wake.conversations.values() if c]          # this client's conversation
    assert own[-1]["content"].strip() == history[-1]["content"][0]["text"].strip()

    history, box, notice, *_ = client.predict("   ", history, api_name="/chat")
    assert "message is empty" in notice and box == "   " and len(history) == 2
    assert len(engine.state.episodes) == 1

    # retry replaces the last turn (the first stays logged as an episode); clear empties the context
    history, _, notice, *_ = client.predict(history, api_name="/retry")
    assert [m["role"] for m in history] == ["user", "assistant"] and "tokens/s" in notice
    assert [len(c) for c in engine.wake.conversations.values() if c] == [2] and len(engine.state.episodes) == 2
    history, notice, _ = client.predict(api_name="/clear")
    assert history == [] and not any(engine.wake.conversations.values()) and "cleared" in notice


def test_stop_ends_a_long_reply_keeps_what_was_said_and_logs_no_episode(lab):
    engine, url = lab
    # a long reply within the decoder's preallocated cache (context + new tokens)
    engine.cfg.wake.context_tokens, engine.cfg.wake.max_new_tokens = 256, 1700
    client = Client(url, verbose=False)
    job = client.submit("Tell me a long story", [], api_name="/chat")
    wait_for(lambda: len(job.outputs()) >= 2, what="the reply to start streaming")
    client.predict(api_name="/stop_reply")
    history, _, notice, *_ = job.result(timeout=60)
    assert "not kept as an episode: the reply was stopped" in notice and len(engine.state.episodes) == 0
    said = int(re.search(r"(\d+) tokens,", notice).group(1))
    assert 0 < said < 1700 and history[-1]["content"]       # the conversation keeps what was said


def test_teach_adds_an_episode_and_refuses_bad_files(lab, tmp_path):
    engine, url = lab
    client = Client(url, verbose=False)
    out = client.predict(PASSAGE, None, api_name="/teach")
    assert "as episode 1" in out[2] and engine.state.episodes.all()[-1].text == PASSAGE

    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02text")
    out = client.predict("", handle_file(str(binary)), api_name="/teach")
    assert "binary" in out[2]
    assert "paste a text" in client.predict("  ", None, api_name="/teach")[2]
    assert len(engine.state.episodes) == 1

    long = tmp_path / "long.txt"          # within the upload limit, longer than one episode holds
    long.write_text("word " * 5000)
    out = client.predict("", handle_file(str(long)), api_name="/teach")
    limit = engine.cfg.wake.max_message_chars
    assert "characters and only the first" in out[2] and len(engine.state.episodes.all()[-1].text) <= limit


def test_sleep_reports_events_through_status_and_stop_rolls_back(lab):
    engine, url = lab
    client = Client(url, verbose=False)
    assert "nothing to consolidate" in client.predict("quick", *SETTINGS, api_name="/sleep")
    engine.wake.teach(PASSAGE, qa=QA)

    bad = list(SETTINGS)
    bad[[k for k, _ in ui.SETTINGS].index("gamma")] = 5
    assert "gamma must be between 0.0 and 1.0" in client.predict("quick", *bad, api_name="/sleep")
    assert client.predict(api_name="/status")["state"] == "awake"

    assert "Sleep 1 started" in client.predict("quick", *SETTINGS, api_name="/sleep")
    seen = wait_for(lambda: (s := client.predict(api_name="/status"))["state"] == "sleeping" and s["events"] > 0 and s,
                    what="a sleeping status with events")
    assert seen["sleep"] == 1 and seen["phase"]
    # chat while asleep: a reply from the pre-sleep memory, saying so; the turn is an episode for the next sleep
    n = len(engine.state.episodes)
    history, box, notice, *_ = client.predict("are you there?", [], api_name="/chat")
    assert "asleep" in notice and box == UNCHANGED and len(history) == 2 and len(engine.state.episodes) == n + 1
    done = wait_for(lambda: (s := client.predict(api_name="/status"))["state"] == "awake" and s, timeout=120,
                    what="the sleep to finish")
    assert done["sleeps"] == 1 and done["events"] > 10 and len(engine.memory.experts()) == 2

    engine.wake.teach("Brenmoor Island exports saffron; its ferry, the Gull Maren, sails at noon.")
    before = memory_tensors(engine)
    long = list(SETTINGS)
    long[0] = 500   # consolidation steps: long enough to stop it midway
    assert "Sleep 2 started" in client.predict("quick", *long, api_name="/sleep")
    wait_for(lambda: client.predict(api_name="/status").get("step"), what="a consolidation step")
    assert "rolled back" in client.predict(api_name="/stop_sleep")
    status = client.predict(api_name="/status")
    assert status["state"] == "awake" and status["sleeps"] == 1 and status.get("cancelled") == 2
    after = memory_tensors(engine)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert "no sleep is running" in client.predict(api_name="/stop_sleep")


def test_launch_refuses_a_bad_login_spec_before_loading_anything(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--state-dir", str(tmp_path), "--auth", "alice"],
                         check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and "expects USER:PASSWORD" in out.stderr and "Traceback" not in out.stderr


def test_inspect_opens_lab_reports_and_only_those(lab, tmp_path):
    from app.lab_report import write_report
    engine, url = lab
    reports = tmp_path / "reports"
    reports.mkdir()
    result = {"experiment": "continual", "episodes": [["p1"], ["p2"]], "date": "2026-01-01 00:00 UTC",
              "settings": {"preset": "quick"}, "machine": {"cpu": "test"},
              "methods": {"seq_sft": {"R": [[0.75, 0.0], [0.25, 1.0]], "average_accuracy": 0.625, "forgetting": 0.5,
                                      "bwt": -0.5, "fwt": 0.0, "seconds": 3.0, "ppl_curve": [10.0, 11.0],
                                      "drift": {"ppl_before": 10.0, "ppl_after": 11.0, "ppl_change": 0.1}}}}
    (reports / "continual.json").write_text(json.dumps(result))
    write_report(result, reports / "continual.html")
    (reports / "broken.json").write_text('{"experiment": "continual", "methods": {"x": {}}}')
    (reports / "broken.html").write_text("<html></html>")
    client = Client(url, verbose=False)

    table, figure_pick, figure, html, notice = client.predict(str(reports / "continual.json"), api_name="/lab_report")
    assert "continual experiment" in notice and "62.5" in table and "-50.0" in table   # average accuracy, BWT
    titles = [c[0] for c in figure_pick["choices"]]
    assert figure_pick["value"] == titles[0] and any("R[i][j]" in t for t in titles) and figure is not None
    assert Path(html).read_text().startswith("<!doctype html>")

    *_, notice = client.predict(str(reports / "broken.json"), api_name="/lab_report")
    assert "cannot open lab report broken.json" in notice
    *_, notice = client.predict(str(ROOT / "README.md"), api_name="/lab_report")   # not a report of the folder
    assert "no lab report" in notice and "notice-error" in notice


def test_test_time_learning_is_switched_from_the_page(lab):
    engine, url = lab
    client = Client(url, verbose=False)
    notice, _ = client.predict(0, api_name="/fast_learning")
    assert "off" in notice and engine.cfg.wake.fast_update_every == 0
    steps = engine.memory.fast_weight_steps
    client.predict(PASSAGE, None, api_name="/teach")
    assert engine.memory.fast_weight_steps == steps          # off: teaching leaves tier 1 alone
    notice, _ = client.predict(3, api_name="/fast_learning")
    assert "every 3 turns" in notice and engine.cfg.wake.fast_update_every == 3
    with pytest.raises(ConfigError, match="between 0 and 1000"):     # the page's field has min 0; the engine checks too
        engine.set_fast_learning(-1)
    with pytest.raises(ConfigError, match="whole number"):
        engine.set_fast_learning(2.5)
    assert engine.cfg.wake.fast_update_every == 3


def test_episodes_view_leaves_out_and_deletes_before_a_sleep(lab):
    engine, url = lab
    client = Client(url, verbose=False)
    engine.wake.teach(PASSAGE, qa=QA)
    engine.wake.teach("The lighthouse of Oskarvik is painted violet.")
    notice, table, box = client.predict("2", api_name="/leave_out")
    assert "left out of the next sleep; the next sleep takes 1" in notice and box == ""
    assert [row[0] for row in table["data"]] == [2, 1] and table["data"][0][5] == "left out of the next sleep"
    assert "no pending episode 7" in client.predict("7", api_name="/leave_out")[0]
    assert "numbers or ranges" in client.predict("two", api_name="/delete_episodes")[0]
    notice, table, _ = client.predict("2", api_name="/delete_episodes")
    assert "deleted for good" in notice and [row[0] for row in table["data"]] == [1]
    assert "on episode(s) 1." in client.predict("quick", *SETTINGS, api_name="/sleep")
    wait_for(lambda: engine.status()["state"] == "awake" and engine.state.sleep_count() == 1, timeout=120,
             what="the sleep to finish")


def test_the_stream_relay_sends_the_newest_snapshot_at_most_once_per_interval_and_the_last_at_once():
    import threading
    import time

    def snapshots():             # 40 growing snapshots, 5 ms apart, the last one "done"
        for i in range(1, 41):
            time.sleep(0.005)
            yield i
    stop = threading.Event()
    t0 = time.perf_counter()
    got = list(ui.in_own_thread(snapshots, stop, interval_s=0.05))
    assert got[-1] == 40 and got == sorted(got)          # the last always comes, in order
    assert 3 <= len(got) <= 8                             # ~0.2 s at one per 50 ms, not 40
    assert time.perf_counter() - t0 < 0.4 and stop.is_set()

    def failing():
        yield 1
        raise ValueError("broken")
    with pytest.raises(ValueError, match="broken"):
        list(ui.in_own_thread(failing, threading.Event(), interval_s=0.05))
    assert list(ui.in_own_thread(lambda: iter([7]), threading.Event())) == [7]


@pytest.mark.parametrize("client", ["gradio_client", "browser"])
def test_the_wake_tab_bench_row_times_the_same_reply_through_the_page(tiny_engine, client):
    """`bench wake`'s page row: the client process (the page in chromium, or gradio's Python
    client) gets the very reply the engine gives alone."""
    from app.page_bench import browser_available, wake_tab_rate
    if client == "browser" and not browser_available():
        pytest.skip("no chromium / Playwright")
    tiny_engine.cfg.wake.max_new_tokens = 12
    row = wake_tab_rate(tiny_engine, ["Hello there"], repeats=2, log=lambda s: None, client=client)
    assert len(row["per_prompt"]) == 2 and row["client"] == client and row["status_vs_engine"] > 0
    for r in row["per_prompt"]:
        assert r["page"]["tokens"] == r["engine"]["tokens"] > 1
        assert r["page"]["ttft_s"] > 0 and r["page"]["tokens_per_s"] > 0
    assert row["page_vs_engine"] > 0 and tiny_engine.cfg.wake.fast_update_every == 0
    ratios = sorted(r["page"]["tokens_per_s"] / r["engine"]["tokens_per_s"] for r in row["per_prompt"])
    per_reply = row["page_vs_engine_per_reply"]   # two replies: their interval is the two, at 50%
    assert (per_reply["low"], per_reply["high"], per_reply["coverage"]) == (round(ratios[0], 3), round(ratios[1], 3), 0.5)


def test_the_page_ticks_every_second_asleep_every_five_awake_and_redraws_a_sleeps_panels_every_few(tiny_engine, tmp_path, monkeypatch):
    """Each tick is a whole event for the server and the browser, on the cores that decode."""
    demo = ui.build_app(tiny_engine, tmp_path)
    page = next(f.fn.__self__ for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "tick")
    first = page.tick(None)
    assert first[page.timer] == ui.AWAKE_TICK_S == page.pace()
    assert set(page.tick(first[page.panel_key])) == {page.sleep.progress}   # nothing changed: the progress line only
    status = tiny_engine.status()
    monkeypatch.setattr(tiny_engine, "status", lambda: {**status, "state": "sleeping", "sleep": 1})
    asleep = page.tick(first[page.panel_key])
    assert asleep[page.timer] == ui.ASLEEP_TICK_S == page.pace()
    # while it runs, new events alone redraw the panels every PANELS_EVERY_S, not every tick
    key = asleep[page.panel_key]
    fewer = key[:2] + [key[2] - 1] + key[3:5]
    assert set(page.tick(fewer + [key[5]])) == {page.sleep.progress}
    assert page.sleep.cons_plot in page.tick(fewer + [key[5] - ui.PANELS_EVERY_S - 1])
    assert page.sleep.cons_plot in page.tick(fewer)   # a key from before (no time): redrawn


def test_the_routing_plots_come_after_the_reply_not_with_each_update(tiny_engine, tmp_path):
    """The streamed event carries text, not plots (chromium redrew them on every update); the
    plots event then draws this session's reply, and leaves the plots as they are after a
    refused message."""
    demo = ui.build_app(tiny_engine, tmp_path)
    wake = next(f.fn.__self__ for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "chat")
    request = SimpleNamespace(session_hash="s1", username=None, headers={}, query_params={})
    updates = list(wake.chat("Hello there", [], request))
    assert len(updates) >= 2 and all(wake.heat not in u and wake.load not in u for u in updates)
    assert wake.strip in updates[-1]
    plots = wake.reply_plots(request)
    assert isinstance(plots[wake.heat], go.Figure) and isinstance(plots[wake.load], go.Figure)
    refused = list(wake.chat("   ", [], request))
    assert "empty" in refused[-1][wake.notice]
    assert all(isinstance(v, type(gr.skip())) for v in wake.reply_plots(request).values())


def test_the_queue_looks_for_new_events_every_10_ms_not_every_1(tiny_engine, tmp_path):
    """Gradio's 1 ms poll took ~10% of the decoder's two cores with the page merely open: the lab
    sets a private attribute, so this checks Gradio still reads it where we measured it."""
    import inspect

    from gradio import queueing
    assert "self.sleep_when_free" in inspect.getsource(queueing.Queue.start_processing)
    demo = ui.launch(tiny_engine, port=None, block=False, reports_dir=tmp_path)
    try:
        assert demo._queue.sleep_when_free == ui.QUEUE_POLL_S
    finally:
        demo.close()
