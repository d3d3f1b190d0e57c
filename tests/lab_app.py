"""The lab page launched on a tiny random-weight engine, for the gradio_client and browser tests."""
from __future__ import annotations

import socket
import time

import pytest

PASSAGE = "The lighthouse of Quarrow Point was painted violet in 1873 by Senna Alvik."
QA = [{"q": "Who painted the lighthouse of Quarrow Point?", "a": "Senna Alvik"}]
# small enough for a tiny-model sleep of a few seconds (the UI's own fields override these)
# the rest of the preset made small too (the page's "More settings" box takes any sleep setting)
MORE = ("prompts_per_episode=2\nanswer_tokens=8\nbatch_size=4\nanchor_prompts=2\nreplay_per_episode=1\n"
        "lti_prefixes=2\nlti_group=2\nlti_tokens=6\ndream_tokens=8\n"
        "max_everyday_changed=1")   # a random tiny model's greedy choices flip at a touch
FAST = {"distill_steps": 2, "dreams": 2, "keep_top": 1, "keep_random": 0, "gamma": 0.5, "alpha": 0.7, "lmbda": 0.0,
        "budget_s": 90}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(name="lab")
def lab_fixture(tiny_engine, tmp_path):
    """(engine, url): the page on a tiny engine with one routed expert (so routing has data);
    lab reports are looked for in tmp_path/reports."""
    from app.ui import launch
    tiny_engine.memory.add_expert(tier=2, born=0)
    tiny_engine.cfg.wake.max_new_tokens = 12
    demo = launch(tiny_engine, port=free_port(), block=False, reports_dir=tmp_path / "reports")
    try:
        yield tiny_engine, demo.local_url
    finally:
        tiny_engine.cancel()
        demo.close()


def wait_for(cond, timeout: float = 60.0, every: float = 0.2, what: str = "condition"):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
