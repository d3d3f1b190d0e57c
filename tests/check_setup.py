"""Shared set-up of the embedded-model checks behind make targets (asleep-check, stop-check)."""
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fresh_engine(name: str, threads: int):
    """A SleepEngine on the embedded model in an empty /tmp/sleep-lab-NAME state dir, test-time
    learning off (the checks time Sleep and chat, not tier 1)."""
    import launch
    from sleep_engine.config import LabConfig
    root = Path(f"/tmp/sleep-lab-{name}")
    shutil.rmtree(root, ignore_errors=True)
    cfg = LabConfig(threads=threads, state_dir=root).validate()
    cfg.wake.fast_update_every = 0
    launch.quiet_libraries(cfg)
    from sleep_engine.engine import SleepEngine
    return SleepEngine(cfg)
