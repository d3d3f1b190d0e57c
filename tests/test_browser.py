"""The lab page in a real browser: Python Playwright driving Debian's headless chromium.

    pytest tests/test_browser.py                      on a tiny random-weight engine
    python tests/test_browser.py URL OUT_DIR          the same walk-through against a running lab
                                                      (how docs/*.png are made with the real model)
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script too
from lab_app import MORE, PASSAGE, lab_fixture  # noqa: F401,E402 - the `lab` fixture
from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402

from app.page_bench import CHROMIUM  # noqa: E402
from app.page_bench import CHROMIUM_ARGS as ARGS  # noqa: E402



def plot_traces(page, elem_id: str) -> int:
    """Number of data traces drawn in a gr.Plot (Plotly keeps them on the graph div)."""
    return page.evaluate(f"() => {{ const gd = document.querySelector('#{elem_id} .js-plotly-plot');"
                         " return gd && gd.data ? gd.data.length : 0; }")


def mark_plot(page, elem_id: str) -> None:
    """Remember what a gr.Plot shows now, for drawn_traces to wait for something newer."""
    page.evaluate(f"() => {{ const gd = document.querySelector('#{elem_id} .js-plotly-plot');"
                  f" window.__shown = window.__shown || {{}}; window.__shown['{elem_id}'] = gd ? gd.data : null; }}")


def drawn_traces(page, elem_id: str, timeout_ms: int = 30_000) -> int:
    """plot_traces once the plot has drawn data newer than its mark_plot (the routing plots are
    drawn by an event of their own just after a reply), or 0 if none comes."""
    try:
        page.wait_for_function(f"() => {{ const gd = document.querySelector('#{elem_id} .js-plotly-plot');"
                               f" return gd && gd.data && gd.data !== (window.__shown || {{}})['{elem_id}']; }}",
                               timeout=timeout_ms)
    except Exception:   # noqa: BLE001 - playwright's TimeoutError: nothing new drawn
        return 0
    return plot_traces(page, elem_id)


def table_rows(page, elem_id: str) -> int:
    return page.locator(f"#{elem_id} tbody tr").count()


def text_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def wait_text(page, elem_id: str, needle: str, timeout: float = 60_000) -> None:
    page.wait_for_function(
        "([id, s]) => { const el = document.getElementById(id); return el && el.innerText.includes(s); }",
        arg=[elem_id, needle], timeout=timeout)


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input")
    box.fill(str(value))
    box.press("Tab")   # commit the value (gr.Number updates on blur)


def choose_file(page, elem_id: str, path: Path) -> None:
    """Pick a file in a gr.File and wait until its upload has finished.
    The finished component lists the file as a row labelled with its name (whose text reads
    "blob\n.txt"); "Uploading 1 file... blob.txt" shows only while it uploads, which a busy machine
    can render too briefly to be seen (two CI failures on 2026-12-05 waited for that text)."""
    page.locator(f"#{elem_id} input[type=file]").set_input_files(str(path))
    page.locator(f'#{elem_id} td.filename[aria-label="{path.name}"]').wait_for(timeout=60_000)


def walk_through(page, url: str, shots: Path, passage: str, steps: int = 2, long_steps: int = 500,
                 sleep_timeout: float = 120_000, question: str = "Hello! Who are you?",
                 more: str = "") -> dict:
    """Chat, teach, sleep to the end, sleep again and stop it; a screenshot of each tab."""
    shots.mkdir(parents=True, exist_ok=True)
    seen: dict = {}
    page.goto(url)
    wait_text(page, "header", "model")
    # the first-run guide: shown once, dismissed for good (this browser's localStorage)
    seen["guide_first"] = page.locator("#guide").is_visible() and "three steps" in text_of(page, "guide")
    page.locator("#guide-ok").click()
    page.wait_for_function("() => !document.querySelector('#guide-ok') || !document.querySelector('#guide-ok').checkVisibility()")
    page.reload()
    wait_text(page, "header", "model")
    page.wait_for_timeout(500)
    seen["guide_after_reload"] = page.locator("#guide").is_visible()

    # Wake: empty message → an error in the page, nothing sent
    page.locator("#send").click()
    wait_text(page, "wake-notice", "message is empty")
    seen["empty_message_turns"] = page.locator("#chatbot .message-row").count()
    # a real message: the reply streams in, then the routing view appears
    mark_plot(page, "routing-heatmap")
    page.locator("#message textarea").fill(question)
    page.locator("#message textarea").press("Enter")
    wait_text(page, "wake-notice", "tokens/s", timeout=120_000)
    seen["chat_text"] = text_of(page, "chatbot")
    seen["heatmap_traces"] = drawn_traces(page, "routing-heatmap")

    # Teach: pasted text works; a binary file is refused with a message
    page.locator("#teach-text textarea").fill(passage)
    page.locator("#teach").click()
    wait_text(page, "teach-notice", "as episode")
    seen["teach_notice"] = text_of(page, "teach-notice")
    page.screenshot(path=str(shots / "wake.png"), full_page=True)
    # a binary file and an oversize file are refused with a message in the page
    blob, big = shots / "blob.txt", shots / "big.txt"
    blob.write_bytes(b"\x00\x01 not text")
    big.write_text("x" * 1_100_000)
    choose_file(page, "teach-file", blob)
    page.locator("#teach").click()
    wait_text(page, "teach-notice", "binary")
    seen["binary_notice"] = text_of(page, "teach-notice")
    page.locator("#teach-file input[type=file]").set_input_files(str(big))
    page.wait_for_function("() => document.body.innerText.includes('exceed the maximum allowed size')",
                           timeout=20_000)
    seen["oversize_text"] = page.evaluate("() => document.body.innerText")

    # Sleep: an out-of-range setting is refused with the engine's message, nothing starts
    page.get_by_role("tab", name="Sleep").click()
    set_number(page, "set-gamma", 5)
    page.locator("#sleep-now").click()
    wait_text(page, "sleep-notice", "gamma must be between")
    seen["bad_setting_notice"] = text_of(page, "sleep-notice")
    set_number(page, "set-gamma", 0.5)
    set_number(page, "set-distill_steps", steps)
    if more:
        page.get_by_text("More settings").click()
        page.locator("#more-settings textarea").fill(more)
    page.locator("#sleep-now").click()
    # the sleep starts once Teach's background tier-1 update is done (a minute with the real model)
    wait_text(page, "sleep-notice", "started", timeout=sleep_timeout)
    seen["start_notice"] = text_of(page, "sleep-notice")
    wait_text(page, "progress-text", "Sleep 1 ·")
    seen["progress_during"] = text_of(page, "progress-text")
    page.wait_for_function("() => document.querySelector('#sleep-now').disabled", timeout=10_000)
    seen["sleep_now_disabled_during"] = True       # a second click cannot start (or hang on) another sleep
    wait_text(page, "progress-text", "finished", timeout=sleep_timeout)
    page.wait_for_function("() => document.querySelectorAll('#panel-forgetting .js-plotly-plot').length > 0")
    page.wait_for_timeout(1500)   # one more timer tick so every panel has drawn
    seen["notice_after_finish"] = text_of(page, "sleep-notice")
    seen["panels"] = {"consolidation": plot_traces(page, "panel-consolidation"),
                      "dreams": plot_traces(page, "panel-dreams"),
                      "forgetting": plot_traces(page, "panel-forgetting"),
                      "growth": plot_traces(page, "panel-growth"),
                      "samples": table_rows(page, "panel-samples"),
                      "dream table": table_rows(page, "panel-dream-table")}
    page.locator("#panel-locality").scroll_into_view_if_needed()   # the table draws its rows when in view
    try:
        wait_text(page, "panel-locality", "×", timeout=10_000)
    except PlaywrightTimeout:
        pass   # the assertion below shows what the table held
    seen["locality"] = text_of(page, "panel-locality")
    page.screenshot(path=str(shots / "sleep.png"), full_page=True)

    # a second sleep: progress moves, a reload re-attaches, Stop rolls back
    page.get_by_role("tab", name="Wake").click()
    page.locator("#teach-text textarea").fill("Brenmoor Island exports saffron; its ferry, the Gull Maren, sails at noon.")
    page.locator("#teach").click()
    wait_text(page, "teach-notice", "as episode")
    page.get_by_role("tab", name="Sleep").click()
    set_number(page, "set-distill_steps", long_steps)
    page.locator("#sleep-now").click()
    wait_text(page, "progress-text", "Sleep 2")
    wait_text(page, "progress-text", "step ", timeout=sleep_timeout)
    first = text_of(page, "progress-text")
    step = "(t) => (t.match(/step (\\d+)\\//) || [])[1]"   # the i of "step i/N"
    page.wait_for_function(f"(t) => ({step})(document.getElementById('progress-text').innerText) !== ({step})(t)",
                           arg=first, timeout=sleep_timeout)
    seen["progress_moved"] = (first, text_of(page, "progress-text"))
    # zoom into the consolidation panel: the next redraw (more steps) keeps the zoom (uirevision)
    gd = "document.querySelector('#panel-consolidation .js-plotly-plot')"
    page.wait_for_function(f"() => {gd} && {gd}.data.length > 0 && {gd}.data[0].x.length > 0")
    page.locator("#panel-consolidation").scroll_into_view_if_needed()
    for _ in range(5):   # a drag that straddles a redraw is lost (the div is replaced): drag again
        box = page.locator("#panel-consolidation .nsewdrag").first.bounding_box()
        if box is None:      # replaced between finding and measuring it
            continue
        y = box["y"] + box["height"] / 2
        page.mouse.move(box["x"] + box["width"] * 0.2, y)      # drag a zoom box, as a user does
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.5, y + 20, steps=5)
        page.mouse.up()
        try:
            page.wait_for_function(f"() => {gd}.layout.xaxis.autorange === false", timeout=2000)
            break
        except PlaywrightTimeout:
            continue
    zoomed = page.evaluate(f"() => [{gd}.layout.xaxis.range, {gd}.data[0].x.length]")
    # the zoom is back on the redrawn div (more steps), or this times out
    try:
        page.wait_for_function(f"([r, n]) => {gd}.data[0].x.length > n && "
                               f"JSON.stringify({gd}.layout.xaxis.range) === JSON.stringify(r)", arg=zoomed,
                               timeout=20_000)
        seen["zoom_kept"] = True
    except PlaywrightTimeout:
        seen["zoom_kept"] = False
    page.reload()
    wait_text(page, "header", "Sleeping")
    page.get_by_role("tab", name="Sleep").click()
    wait_text(page, "progress-text", "Sleep 2")
    seen["reattached"] = text_of(page, "progress-text")
    page.locator("#stop-sleep").click()
    wait_text(page, "sleep-notice", "rolled back", timeout=sleep_timeout)
    wait_text(page, "progress-text", "was stopped")
    seen["after_stop"] = text_of(page, "header")

    # Inspect: the completed sleep with its dreams, experts and probes
    page.get_by_role("tab", name="Inspect").click()
    wait_text(page, "inspect-notice", "events")
    seen["inspect_notice"] = text_of(page, "inspect-notice")
    seen["downloads"] = {}
    for elem in ("dl-events", "dl-matrix"):
        with page.expect_download(timeout=20_000) as info:
            page.locator(f"#{elem}").click()
        seen["downloads"][info.value.suggested_filename] = Path(info.value.path()).read_text()
    page.screenshot(path=str(shots / "inspect.png"), full_page=True)

    # Wake again: the new expert now shows in the routing of a reply
    page.get_by_role("tab", name="Wake").click()
    mark_plot(page, "routing-heatmap")
    page.locator("#message textarea").fill(question)
    page.locator("#message textarea").press("Enter")
    page.wait_for_function("() => document.getElementById('wake-notice').innerText.includes('episode 4')",
                           timeout=120_000)
    seen["heatmap_after_sleep"] = drawn_traces(page, "routing-heatmap")
    page.screenshot(path=str(shots / "wake-after-sleep.png"), full_page=True)
    return seen


def needs_chromium() -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("SLEEP_LAB_REQUIRE_BROWSER"):   # set by .ci/run, which installs chromium
            pytest.fail(f"no chromium at {CHROMIUM}")
        pytest.skip(f"no chromium at {CHROMIUM} (.ci/run installs Debian's; locally: apt-get install chromium)")


def test_walk_through_in_a_real_browser(lab, tmp_path):
    needs_chromium()
    from playwright.sync_api import sync_playwright
    engine, url = lab
    shots = Path(os.environ.get("SLEEP_LAB_SCREENSHOTS", tmp_path / "shots"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            seen = walk_through(page, url, shots, PASSAGE, more=MORE)
        finally:
            browser.close()
    assert seen["guide_first"] and not seen["guide_after_reload"]
    assert seen["empty_message_turns"] == 0
    assert "Hello! Who are you?" in seen["chat_text"] and seen["heatmap_traces"] == 1
    assert "episode 2" in seen["teach_notice"]            # the chat turn was episode 1
    assert "Sleep now consolidates it" in seen["teach_notice"]   # what happens next
    assert "binary" in seen["binary_notice"]
    assert "exceed the maximum allowed size" in seen["oversize_text"]
    assert "gamma must be between 0.0 and 1.0" in seen["bad_setting_notice"]
    assert "Sleep 1" in seen["progress_during"] and "probe_" not in seen["progress_during"]   # human phase names
    assert seen["sleep_now_disabled_during"]
    assert "within 90 s" in seen["start_notice"]          # the quick preset is a time budget
    assert "started" not in seen["notice_after_finish"]    # the start notice does not outlive the sleep
    # the locality table: the taught text's own expert (episode 2; the chat turn has its own) and gate numbers
    assert re.search(r"\be\d+\s+2\s+0\.\d{3}\s+0\.\d{3}\s+[\d.]+×", seen["locality"]), seen["locality"]
    panels_with_data = [k for k, v in seen["panels"].items() if v > 0]
    assert len(panels_with_data) >= 5, seen["panels"]
    assert seen["progress_moved"][0] != seen["progress_moved"][1]
    assert seen["zoom_kept"], "a live redraw reset the user's zoom"
    assert "Sleep 2" in seen["reattached"]
    assert "Awake" in seen["after_stop"] and "sleeps1" in seen["after_stop"].replace("\n", "").replace(" ", "")
    assert engine.state.sleep_count() == 1 and engine.status()["cancelled"] == 2
    assert "0001" in seen["inspect_notice"]
    events = seen["downloads"]["sleep-0001-events.jsonl"].splitlines()
    assert '"kind": "done"' in events[-1] and len(events) > 10
    assert seen["downloads"]["accuracy-matrix.csv"].splitlines()[0].startswith("sleep,episode_")
    assert seen["heatmap_after_sleep"] == 1
    assert all((shots / f"{tab}.png").stat().st_size > 10_000 for tab in ("wake", "sleep", "inspect"))


def test_what_is_typed_while_a_reply_streams_stays_in_the_box(lab):
    """The reply's first update empties the message box; the later ones leave it alone (they
    emptied it on every update, wiping a next question typed meanwhile)."""
    needs_chromium()
    from playwright.sync_api import sync_playwright
    engine, url = lab
    engine.cfg.wake.context_tokens, engine.cfg.wake.max_new_tokens = 256, 1700   # within the decoder's cache
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            wait_text(page, "header", "model")
            if page.locator("#guide-ok").is_visible():
                page.locator("#guide-ok").click()
            box = page.locator("#message textarea")
            box.fill("Tell me a long story")
            box.press("Enter")
            page.wait_for_function("() => document.querySelector('#message textarea').value === ''")
            box.fill("and a next question")
            streaming_at_fill = "tokens/s" not in text_of(page, "wake-notice")
            wait_text(page, "wake-notice", "tokens/s", timeout=120_000)
            assert streaming_at_fill, "the reply ended before anything was typed: make it longer"
            assert box.input_value() == "and a next question"
        finally:
            browser.close()


def readme_shots(page, shots: Path, question: str) -> None:
    """The README's Inspect and Wake shots, after walk_through: sleep 1's memories before and after
    asked `question`, then Wake asked it in a fresh conversation."""
    page.get_by_role("tab", name="Inspect").click()
    page.locator("#before-after").click()
    page.locator("#ba-question textarea").fill(question)
    page.locator("#ba-ask").click()
    wait_text(page, "ba-notice", "sleep", timeout=120_000)
    page.screenshot(path=str(shots / "inspect.png"), full_page=True)
    page.get_by_role("tab", name="Wake").click()
    page.locator("#clear").click()
    wait_text(page, "wake-notice", "cleared")
    mark_plot(page, "routing-heatmap")
    page.locator("#message textarea").fill(question)
    page.locator("#message textarea").press("Enter")
    wait_text(page, "wake-notice", "tokens/s", timeout=120_000)
    drawn_traces(page, "routing-heatmap")   # the shot shows this reply's routing
    page.screenshot(path=str(shots / "wake.png"), full_page=True)


if __name__ == "__main__":   # screenshots of a running lab: python tests/test_browser.py URL OUT_DIR
    from playwright.sync_api import sync_playwright
    url, out = sys.argv[1], Path(sys.argv[2])
    passage = ("The town of Velmora Ridge was founded in 1847 by the cartographer Idris Kallowen. It sits beside "
               "Lake Tessarine and is known for its copper-roofed clock tower.")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        print(walk_through(page, url, out, passage, steps=int(os.environ.get("STEPS", "6")), long_steps=200,
                           sleep_timeout=900_000, question="What is the capital of France?"))
        readme_shots(page, out, "Who founded Velmora Ridge?")
        browser.close()
