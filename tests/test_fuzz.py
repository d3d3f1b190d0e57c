"""Bad input, fuzzed (hypothesis): chat messages, teach files, sleep settings lines, CLI flags,
state-dir paths and episode-log records. Each case ends in a clear error or a valid result —
never another exception, never a state change on refusal. Case counts: FUZZ_EXAMPLES (default
below) per property; docs/reliability.md has the figures of the last run."""
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import launch
from app import ui
from sleep_engine.config import ConfigError, SleepConfig
from sleep_engine.store import EpisodeLog, StateDir
from sleep_engine.wake import WakeBusy, WakeInputError

N = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FIXTURE = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
TEMPLATE = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "system", "user", "assistant", "\n", "\x00", "\x1b[2J",
            "\u202e", "\ud7ff", "{{ }}", "{% for %}", "\\", "\r\n", " "]
messages = st.one_of(st.text(max_size=300), st.lists(st.sampled_from(TEMPLATE) | st.text(max_size=8), max_size=40).map("".join))


@settings(max_examples=N, deadline=None, suppress_health_check=FIXTURE)
@given(message=messages)
def test_chat_messages_are_refused_clearly_or_stay_text(tiny_engine, message):
    tok, wake = tiny_engine.tokenizer, tiny_engine.wake
    start = tok.convert_tokens_to_ids("<|im_start|>")
    before = len(tiny_engine.state.episodes)
    try:
        text, _ = ui_clean(message, tiny_engine)
    except WakeInputError as e:
        assert str(e) and len(tiny_engine.state.episodes) == before
        return
    ids, _ = wake.build_prompt(text, session="fuzz")
    assert ids.count(start) == 3      # system, user, assistant: whatever the message spells
    assert len(ids) <= tiny_engine.cfg.wake.context_tokens


def ui_clean(message, engine):
    from sleep_engine.wake import clean_text
    return clean_text(message, "message", engine.cfg.wake.max_message_chars)


@settings(max_examples=max(10, N // 10), deadline=None, suppress_health_check=FIXTURE)
@given(message=messages)
def test_chat_turns_end_in_a_logged_episode_or_a_clear_refusal(tiny_engine, message):
    before = len(tiny_engine.state.episodes)
    try:
        reply = tiny_engine.wake.reply(message, session="fuzz")
    except (WakeInputError, WakeBusy) as e:
        assert str(e) and len(tiny_engine.state.episodes) == before
        return
    assert reply.done and len(tiny_engine.state.episodes) == before + 1
    assert EpisodeLog(tiny_engine.state.episodes.path).all()[-1].id == reply.episode_id   # the log reads back


def test_a_one_megabyte_message_is_cut_with_a_notice(tiny_engine):
    reply = tiny_engine.wake.reply("word " * 200_000)
    assert reply.done and any("only the first" in n for n in reply.notices)
    assert reply.prompt_tokens <= tiny_engine.cfg.wake.context_tokens


@settings(max_examples=N, deadline=None, suppress_health_check=FIXTURE)
@given(data=st.one_of(st.binary(max_size=400), st.text(max_size=400).map(lambda t: t.encode("utf-8", "surrogatepass")),
                      st.just(b""), st.just(b"   \n\t")), jsonl=st.booleans())
def test_teach_files_are_refused_clearly_or_become_episodes(tiny_engine, tmp_path, data, jsonl):
    f = tmp_path / ("fuzz.jsonl" if jsonl else "fuzz.txt")
    f.write_bytes(data)
    before = len(tiny_engine.state.episodes)
    try:
        items = launch.read_episodes(str(f))
        for item in items:
            tiny_engine.wake.teach(item["text"], source=item["source"], qa=item["qa"])
    except (OSError, WakeInputError) as e:
        assert str(e)
        assert len(tiny_engine.state.episodes) == before   # nothing taught from a refused file
        return
    assert len(tiny_engine.state.episodes) == before + len(items)


FIELDS = [f for f in vars(SleepConfig()) if f != "preset"]
values = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False).map(str),
                   st.sampled_from(["true", "false", "yes", "maybe", "", "nan", "-inf", "1e309", "0x10", "1_000"]),
                   st.text(max_size=12))
lines = st.lists(st.tuples(st.sampled_from(FIELDS) | st.text(max_size=10), st.sampled_from(["=", "", " = ", "=="]),
                           values).map(lambda t: f"{t[0]}{t[1]}{t[2]}"), max_size=6).map("\n".join)


@settings(max_examples=N * 2, deadline=None)
@given(more=lines, fields=st.lists(st.one_of(st.none(), st.integers(-5, 600), st.floats(allow_nan=True, allow_subnormal=False),
                                            st.text(max_size=5)), min_size=len(ui.SETTINGS), max_size=len(ui.SETTINGS)))
def test_sleep_settings_lines_give_a_valid_config_or_one_clear_error(more, fields):
    try:
        cfg = ui.sleep_settings("quick", fields, more)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert cfg.validate() is cfg
    try:
        launch_cfg = SleepConfig.from_preset("quick", **launch.parse_settings([ln for ln in more.splitlines() if ln.strip()
                                                                                and not ln.strip().startswith("#")]))
    except ConfigError:
        return
    assert launch_cfg.validate() is launch_cfg


flags = st.lists(st.sampled_from(["--quantize", "int3", "int4", "--threads", "-1", "0", "999", "--port", "70000",
                                  "--tiers", "9", "1", "--seed", "x", "--max-new-tokens", "0", "--temperature",
                                  "nan", "-1", "--device", "cuda:7", "tpu", "--auth", "alice", "a:b", "chat", "--once",
                                  "", "teach", "sleep", "--set", "dreams=-1", "undo-sleep", "--json", "bench", "wake"]),
                 max_size=8)


@settings(max_examples=N * 2, deadline=None)
@given(argv=flags)
def test_cli_flags_parse_to_a_config_or_exit_2(argv):
    try:
        args = launch.build_parser().parse_args(argv)
    except SystemExit as e:
        assert e.code in (0, 2)
        return
    try:
        launch.config_from_args(args)
        launch.parse_auth(getattr(args, "auth", None))
    except ConfigError as e:
        assert str(e)


@settings(max_examples=N, deadline=None, suppress_health_check=FIXTURE)
@given(name=st.text(min_size=1, max_size=30), kind=st.sampled_from(["dir", "file", "nested-in-file"]))
def test_state_dir_paths_open_or_fail_with_an_os_error(tmp_path, name, kind):
    base = tmp_path / "p"
    base.mkdir(exist_ok=True)
    safe = name.replace("/", "_").replace("\x00", "_")
    if safe in (".", ".."):
        safe = "_" + safe
    target = base / safe
    if kind != "dir" and not target.exists():
        target.write_text("not a directory")
    if kind == "nested-in-file":
        target = target / "state"
    try:
        s = StateDir(target)
    except OSError as e:      # launch.py prints it as one "error:" line, exit 2
        assert str(e)
        return
    s.close()


records = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_subnormal=False) | st.text(max_size=10),
                       lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
                           ["id", "kind", "text", "qa", "messages", "source", "time", "q", "a", "role", "content"]),
                           c, max_size=6), max_leaves=12)


@settings(max_examples=N, deadline=None, suppress_health_check=FIXTURE)
@given(rows=st.lists(records, max_size=6), torn=st.text(max_size=20))
def test_any_episode_log_reads_and_appends_without_crashing(tmp_path, rows, torn):
    path = tmp_path / "episodes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)
    log = EpisodeLog(path)
    ids = [e.id for e in log.all()]
    assert ids == sorted(set(ids))
    ep = log.append("taught", "a fact")
    assert ep.id > max([0] + [r["id"] for r in rows if isinstance(r, dict) and type(r.get("id")) is int])
    assert EpisodeLog(path).all()[-1].text == "a fact"
    path.unlink()


@pytest.mark.parametrize("qa", ["notalist", [1], [{"q": "x"}], [{"q": "", "a": "y"}], {"q": "a", "a": "b"}])
def test_bad_probe_items_are_refused_before_anything_is_logged(tiny_engine, qa):
    with pytest.raises(WakeInputError, match="qa"):
        tiny_engine.wake.teach("Some fact.", qa=qa)
    assert len(tiny_engine.state.episodes) == 0
