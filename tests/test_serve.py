"""`launch.py serve` (app/openai_api.py) on the tiny model, driven by the `openai` client: streaming
and not, each turn logged as an episode, requests private to each other, the same --auth, the
reply from the pre-sleep memory while a sleep runs, clear errors for bad requests."""
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from conftest import make_tiny_engine

from app.openai_api import MODEL_ID, build_api

AUTH = ("ada", "s3cret")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    engine = make_tiny_engine(tmp_path_factory.mktemp("serve"), tokenizer)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(build_api(engine, AUTH), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield {"engine": engine, "url": f"http://127.0.0.1:{port}/v1"}
    srv.should_exit = True
    thread.join(10)
    engine.close()


def client(server, key="ada:s3cret"):
    return openai.OpenAI(api_key=key, base_url=server["url"], max_retries=0, timeout=60)


def test_streamed_reply_is_logged_as_a_wake_turn(server):
    engine = server["engine"]
    before = len(engine.state.episodes)
    chunks = list(client(server).chat.completions.create(
        model=MODEL_ID, stream=True, max_tokens=6, messages=[{"role": "user", "content": "Tell me a story."}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and len(chunks) >= 3
    ep = engine.state.episodes.all()[-1]
    assert len(engine.state.episodes) == before + 1 and ep.kind == "turn"
    assert ep.messages == [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": text}]
    assert ep.text == f"User: Tell me a story.\nAssistant: {text}"   # exactly as a Wake turn
    assert engine.wake.conversations.keys() <= {"local"}              # the request's conversation is gone


def test_plain_reply_matches_the_wake_reply_and_sees_only_its_own_turns(server):
    engine = server["engine"]
    got = client(server).chat.completions.create(model=MODEL_ID, max_tokens=8, messages=[
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"}])
    wake = engine.wake.reply("What is the capital of France?", session="check")
    engine.wake.clear("check")
    assert got.choices[0].message.content == wake.text
    assert got.usage.completion_tokens == len(wake.token_ids) and got.usage.prompt_tokens == wake.prompt_tokens
    # the client's earlier turns are in its prompt: a different prompt, so (on this model) a different reply
    with_history = client(server).chat.completions.create(model=MODEL_ID, max_tokens=8, messages=[
        {"role": "user", "content": "My secret code is AAA-123."}, {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "What is the capital of France?"}])
    assert with_history.usage.prompt_tokens > got.usage.prompt_tokens


def test_models_and_auth(server):
    assert [m.id for m in client(server).models.list()] == [MODEL_ID]
    with pytest.raises(openai.AuthenticationError):
        client(server, key="ada:wrong").models.list()
    r = httpx.get(server["url"] + "/models", auth=AUTH)     # Basic works too
    assert r.status_code == 200
    assert httpx.get(server["url"] + "/models").status_code == 401


def test_bad_requests_get_clear_errors_and_change_nothing(server):
    engine = server["engine"]
    before = len(engine.state.episodes)
    c = client(server)
    for messages, why in [([], "non-empty"), ([{"role": "assistant", "content": "hi"}], "last message"),
                          ([{"role": "user", "content": "   "}], "empty"),
                          ([{"role": "user", "content": [{"type": "image_url"}]}], "text")]:
        with pytest.raises(openai.BadRequestError, match=why):
            c.chat.completions.create(model=MODEL_ID, messages=messages)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.chat.completions.create(model=MODEL_ID, temperature=9, messages=[{"role": "user", "content": "hi"}])
    r = httpx.post(server["url"] + "/chat/completions", content=b"{oops", auth=AUTH)
    assert r.status_code == 400
    assert len(engine.state.episodes) == before


def test_while_asleep_it_answers_as_wake_does(server):
    from sleep_engine.wake import ASLEEP_NOTICE
    engine = server["engine"]
    live = client(server).chat.completions.create(model=MODEL_ID, max_tokens=6, messages=[{"role": "user", "content": "hi"}])
    engine._snapshot = engine.memory.twin()     # as a sleep begins: the memory from before it
    engine.memory.add_expert(tier=2, born=9)    # … which the sleep then changes
    with torch.no_grad():
        for e in engine.memory.expert_modules("e0"):
            e.B.normal_()
    engine._status = {"state": "sleeping", "phase": "consolidation", "progress": 0.5}
    try:
        got = client(server).chat.completions.create(model=MODEL_ID, max_tokens=6,
                                                     messages=[{"role": "user", "content": "hi"}])
        assert got.model_extra["sleep_lab"]["notices"][0] == ASLEEP_NOTICE
        assert got.choices[0].message.content == live.choices[0].message.content
    finally:
        engine._status, engine._snapshot = {"state": "awake"}, None
        engine.memory.remove_experts(["e0"])
