"""An OpenAI-compatible endpoint over Wake (docs/export.md, "Serve"): `launch.py serve`.

    GET  /v1/models              the one model this lab serves
    POST /v1/chat/completions    streaming (server-sent events) and not

Each request is its own conversation (the client sends all its turns; nobody sees another's),
and its last user message with the reply is logged as an episode exactly as a Wake turn is.
While the model sleeps it answers as Wake does: with the asleep notice (HTTP 503).
`--auth USER:PASSWORD` is checked on every route: `api_key="USER:PASSWORD"` (Bearer) or Basic.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import queue
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from sleep_engine.wake import WakeBusy, WakeInputError

MODEL_ID = "sleep-lab"
ROLES = ("system", "user", "assistant")


class BadRequest(ValueError):
    pass


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def authorized(header: str | None, auth: tuple[str, str] | None) -> bool:
    if auth is None:
        return True
    want = f"{auth[0]}:{auth[1]}"
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode()
        except ValueError:
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode(), want.encode())


def text_of(content) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest("message content must be text (a string or a list of text parts)")


def parse_request(body) -> dict:
    """OpenAI's request → (system, earlier turns, last user message, sampling), or BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    turns, system = [], None
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"each message needs a role among {', '.join(ROLES)}")
        if m["role"] == "system":
            system = text_of(m.get("content"))
        else:
            turns.append({"role": m["role"], "content": text_of(m.get("content"))})
    if not turns or turns[-1]["role"] != "user":
        raise BadRequest("the last message must be the user's")
    if body.get("n", 1) != 1:
        raise BadRequest("only n = 1 is supported")
    sampling = {}
    for theirs, ours in (("max_completion_tokens", "max_new_tokens"), ("max_tokens", "max_new_tokens"),
                         ("temperature", "temperature"), ("top_p", "top_p")):
        if body.get(theirs) is not None and ours not in sampling:
            sampling[ours] = body[theirs]
    seed = body.get("seed") or 0
    if not isinstance(seed, int):
        raise BadRequest("'seed' must be an integer")
    return {"system": system, "history": turns[:-1], "message": turns[-1]["content"],
            "sampling": sampling, "seed": seed, "stream": bool(body.get("stream"))}


def _finish(reply, max_new_tokens: int) -> str:
    return "length" if len(reply.token_ids) >= max_new_tokens and not reply.stopped else "stop"


class ReplyThread:
    """One Wake reply generated in its own thread (the model's lock is taken and released there,
    never across threads), its snapshots handed over a queue: None ends it, an exception is
    what stopped it. The request's conversation is dropped when it ends."""

    def __init__(self, wake, req: dict, session: str):
        self.items: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        wake.open_conversation(session, req["history"])
        threading.Thread(target=self._run, args=(wake, req, session), daemon=True).start()

    def _run(self, wake, req, session) -> None:
        try:
            for reply in wake.stream(req["message"], self.stop, seed=req["seed"], session=session,
                                     system=req["system"], sampling=req["sampling"]):
                self.items.put(reply)
        except Exception as e:  # noqa: BLE001 — handed to the request, which answers with it
            self.items.put(e)
        finally:
            wake.clear(session)
            self.items.put(None)

    def next(self):
        return self.items.get()

    def last(self, reply):
        while (item := self.items.get()) is not None:
            if isinstance(item, Exception):
                raise item
            reply = item
        return reply


def build_api(engine, auth: tuple[str, str] | None = None) -> FastAPI:
    api = FastAPI(title="Sleep Lab", docs_url=None, redoc_url=None, openapi_url=None)
    wake = engine.wake

    @api.middleware("http")
    async def check_auth(request: Request, call_next):
        if not authorized(request.headers.get("authorization"), auth):
            await asyncio.sleep(0.2)   # a wrong key costs the guesser time
            return error(401, "wrong or missing credentials (--auth)", "authentication_error")
        return await call_next(request)

    @api.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": int(time.time()),
                                            "owned_by": "sleep-lab", "base": engine.backbone.name}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            req = parse_request(json.loads(await request.body() or b"null"))
            gen = wake.sampling(req["sampling"])
        except (BadRequest, WakeInputError, json.JSONDecodeError) as e:
            return error(400, str(e))
        run = ReplyThread(wake, req, f"api-{uuid.uuid4().hex}")
        first = await run_in_threadpool(run.next)   # bad input and the asleep notice come before any byte
        if isinstance(first, WakeInputError):
            return error(400, str(first))
        if isinstance(first, WakeBusy):
            return error(503, str(first), "server_busy")
        if first is None or isinstance(first, Exception):
            return error(500, f"generation failed: {first}", "server_error")
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": MODEL_ID}
        if req["stream"]:
            return StreamingResponse(_events(run, first, meta, gen.max_new_tokens), media_type="text/event-stream")
        reply = await run_in_threadpool(run.last, first)
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": _finish(reply, gen.max_new_tokens)}],
                "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": len(reply.token_ids),
                          "total_tokens": reply.prompt_tokens + len(reply.token_ids)},
                "sleep_lab": {"episode_id": reply.episode_id, "notices": reply.notices}}

    return api


def _events(run: ReplyThread, first, meta: dict, max_new_tokens: int):
    """Server-sent events: a role chunk, text deltas, a finish chunk, [DONE]. A client that goes
    away stops the reply (closing this generator sets the stop event)."""
    def chunk(delta, finish=None, **extra):
        body = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    sent, reply = "", first
    try:
        yield chunk({"role": "assistant", "content": ""})
        item = first
        while item is not None:
            if isinstance(item, Exception):
                yield chunk({}, "error", sleep_lab={"error": str(item)})
                return
            reply = item
            # a half-decoded character shows as U+FFFD until its next token: hold it back
            ready = reply.text if reply.done else reply.text.rstrip("\ufffd")
            if len(ready) > len(sent) and ready.startswith(sent):
                yield chunk({"content": ready[len(sent):]})
                sent = ready
            item = run.next()
        yield chunk({}, _finish(reply, max_new_tokens), sleep_lab={"episode_id": reply.episode_id,
                                                                  "notices": reply.notices})
        yield "data: [DONE]\n\n"
    finally:
        run.stop.set()


def serve(engine, host: str = "127.0.0.1", port: int = 8000, auth: tuple[str, str] | None = None) -> None:
    """Run the endpoint until Ctrl-C."""
    import uvicorn
    uvicorn.run(build_api(engine, auth), host=host, port=port, log_level="warning")
