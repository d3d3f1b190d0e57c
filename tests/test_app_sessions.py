"""Private sessions and the login, through the page's HTTP API (gradio_client + plain HTTP)."""
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from conftest import ROOT
from gradio_client import Client
from lab_app import free_port, lab_fixture  # noqa: F401 - the `lab` fixture


def test_two_clients_have_two_private_conversations(lab):
    engine, url = lab
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    a.predict("my secret code is AAA-123", [], api_name="/chat")
    a.predict("and my name is Ada", [], api_name="/chat")
    tiers_b = b.predict("What is my secret code?", [], api_name="/chat")[4]   # chatbot, box, notice, strip, tiers, header
    context_b = tiers_b["data"][0][2]       # tier 0 counts B's own conversation, not A's (or the terminal's)
    assert context_b == f"{engine.wake.context_tokens(next(k for k, c in engine.wake.conversations.items() if len(c) == 2))}" \
        f" / {engine.cfg.wake.context_tokens} tokens"
    convs = [c for c in engine.wake.conversations.values() if c]
    assert len(convs) == 2 and sorted(len(c) for c in convs) == [2, 4]
    b_conv = next(c for c in convs if "What is my secret" in c[0]["content"])
    assert not any("AAA-123" in m["content"] for m in b_conv)          # B's prompt never carried A's turn
    # B can retry and clear only its own turns
    history, _, notice, *_ = b.predict([], api_name="/retry")
    assert "tokens/s" in notice and history[0]["content"][0]["text"] == "What is my secret code?"
    b.predict(api_name="/clear")
    left = [c for c in engine.wake.conversations.values() if c]
    assert len(left) == 1 and left[0][0]["content"] == "my secret code is AAA-123"
    _, _, notice, *_ = b.predict([], api_name="/retry")
    assert "nothing to retry" in notice


@pytest.fixture
def locked_lab(tiny_engine, tmp_path):
    from app.ui import launch
    demo = launch(tiny_engine, port=free_port(), block=False, auth=("alice", "s3cret"),
                  reports_dir=tmp_path / "reports")
    try:
        yield tiny_engine, demo.local_url.rstrip("/")
    finally:
        demo.close()


ROUTES = [("GET", "/"), ("GET", "/config"), ("GET", "/gradio_api/info"), ("GET", "/info"),
          ("POST", "/gradio_api/call/chat"), ("POST", "/gradio_api/call/teach"), ("POST", "/gradio_api/call/sleep"),
          ("POST", "/gradio_api/call/undo_sleep"), ("POST", "/gradio_api/call/status"),
          ("POST", "/gradio_api/queue/join"), ("POST", "/gradio_api/run/predict"), ("POST", "/gradio_api/upload"),
          ("GET", "/gradio_api/file=README.md"), ("GET", "/gradio_api/queue/data?session_hash=x")]


def status_of(method, url, cookie=None):
    req = urllib.request.Request(url, method=method, data=b'{"data": []}' if method == "POST" else None,
                                 headers={"Content-Type": "application/json", **({"Cookie": cookie} if cookie else {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""


def test_with_auth_every_route_refuses_without_the_right_login(locked_lab):
    engine, url = locked_lab
    engine.wake.teach("The vault code of Harrowby is QX-7741.")
    engine.wake.reply("my secret code is AAA-123", session="someone")
    # a wrong password gets no session cookie
    req = urllib.request.Request(url + "/login", data=b"username=alice&password=wrong", method="POST",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(req, timeout=30)
    assert bad.value.code in (400, 401) and "set-cookie" not in {k.lower() for k in bad.value.headers}
    for cookie in (None, "access-token=forged; access-token-unsecure=forged"):
        for method, route in ROUTES:
            code, body = status_of(method, url + route, cookie)
            # "/" is the login page: Gradio embeds the page layout in it, but no data (no episode, no
            # conversation, no state: those come from the API, which answers 401)
            refused = code in (401, 403, 404) or (route == "/" and '"auth_required":true' in body and not any(
                w in body for w in ("QX-7741", "AAA-123", str(engine.cfg.state_dir), "tiny-llama")))
            assert refused, f"{method} {route} with cookie={cookie!r} answered {code}"
    assert len(engine.state.episodes) == 2
    with pytest.raises(Exception):
        Client(url, auth=("alice", "wrong"), verbose=False)
    ok = Client(url, auth=("alice", "s3cret"), verbose=False)
    assert ok.predict(api_name="/status")["state"] == "awake"


def test_a_public_host_without_login_warns_on_start(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--host", "0.0.0.0", "--state-dir", str(tmp_path),
                          "--model", str(tmp_path / "no-model")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "warning: the lab is reachable by others and has no login" in out.stderr


def test_inspect_undo_button_takes_the_last_sleep_back(lab):
    from lab_app import PASSAGE, QA
    from test_sleep import tiny_settings
    engine, url = lab
    client = Client(url, verbose=False)
    _, notice, *_ = client.predict(api_name="/undo_sleep")
    assert "no completed sleep to undo" in notice
    engine.wake.teach(PASSAGE, qa=QA)
    engine.sleep(tiny_settings(dreaming=False, lti=False), wait=True)
    experts = engine.memory.expert_ids()
    _, notice, *_ = client.predict(api_name="/undo_sleep")
    assert "Sleep 1 undone" in notice and engine.state.sleep_count() == 0
    assert engine.memory.expert_ids() == [e for e in experts if e != "e1"] and len(engine.pending_episodes()) == 1


def test_inspect_export_writes_only_a_named_folder_under_exports(lab):
    engine, url = lab
    client = Client(url, verbose=False)
    exports = engine.cfg.state_dir.parent / "exports"
    for bad in ("../outside", "/tmp/x", ""):
        assert "Give the export a name" in client.predict(bad, api_name="/export")
    assert not (engine.cfg.state_dir.parent / "outside").exists()
    notice = client.predict("first", api_name="/export")
    assert f"Exported {len(engine.memory.expert_ids())} expert(s)" in notice and (exports / "first" / "memory.safetensors").is_file()
    assert "not empty" in client.predict("first", api_name="/export")   # never over an earlier one


def test_generation_settings_are_per_browser_and_checked(lab):
    import re

    from gradio_client.exceptions import AppError
    engine, url = lab
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    with pytest.raises(AppError, match="greater than maximum"):
        a.predict(8, 0.0, 0.9, 5.0, api_name="/generation")
    assert "max new tokens 2" in a.predict(2, 0.0, 0.9, 1.3, api_name="/generation")
    counts = [int(re.search(r"(\d+) tokens,", c.predict("Tell me a long story.", [], api_name="/chat")[2]).group(1))
              for c in (a, b)]
    assert counts[0] <= 2 < counts[1] == engine.cfg.wake.max_new_tokens   # A's two tokens; B keeps the defaults


def test_inspect_before_and_after_answers_one_question_with_both_memories(lab):
    from lab_app import PASSAGE, QA
    from test_sleep import tiny_settings
    engine, url = lab
    client = Client(url, verbose=False)
    assert "pick a past sleep" in client.predict(None, "Where?", api_name="/before_after")[2]
    engine.wake.teach(PASSAGE, qa=QA)
    engine.sleep(tiny_settings(dreaming=False, lti=False), wait=True)
    number = engine.state.sleep_count()
    before, after, notice = client.predict(f"{number:04d}", "Where is it?", api_name="/before_after")
    assert f"sleep {number}" in notice and "fast weights off" in notice
    assert isinstance(before, str) and isinstance(after, str)
    assert "question is empty" in client.predict(f"{number:04d}", "  ", api_name="/before_after")[2]
