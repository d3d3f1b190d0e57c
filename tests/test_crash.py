"""Kill-stress, short version (the full loop: `make stress`): `launch.py` sleep / teach / chat on
a tiny model, SIGKILLed at random instants and at each step of a sleep's commit; after every
kill the state loads, every taught episode is there at most once (exactly once if its teach was
acknowledged), consolidated episodes ⇔ experts, and the memory is the one saved."""
import os

from stress_state import run_trials


def test_kill_at_random_instants_leaves_a_whole_state(tmp_path, embedded_source):
    trials = int(os.environ.get("SLEEP_LAB_STRESS_TRIALS", "2"))
    stats = run_trials(tmp_path / "stress", embedded_source, trials, seed=int(os.environ.get("SLEEP_LAB_STRESS_SEED", "0")),
                       log=lambda s: None)
    assert stats["trials"] == trials and stats["crashpoints"] == 2
    assert stats["final"]["sleeps"] >= 2 and stats["final"]["episodes"] >= 3
