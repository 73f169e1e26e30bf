"""The log's heartbeat names a long step while it runs (split from tests/system/test_progress.py)."""

from __future__ import annotations

import io
import re
import time

from hica_bench.progress import LogEvents
from hica_bench.results import CellKey

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "  # as in tests/system/test_progress.py


def test_a_long_step_is_announced_by_the_heartbeat():
    log = io.StringIO()
    key = CellKey(dataset="breastmnist", size=28, method="slow [method]", encoder="pixels", k=1, seed=0, max_test=None)
    with LogEvents(log, heartbeat=0.2) as events:
        events.stage("encoder settings (probed once)")
        deadline = time.monotonic() + 30
        while "still encoder settings" not in log.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        events.cells("pixels", 3, 2)
        events.cell(key)
        while "still running" not in log.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = log.getvalue().splitlines()
    assert all(re.match(STAMP, line) for line in lines), lines
    texts = [line[20:] for line in lines]
    assert texts[0].startswith("still encoder settings (probed once) (")  # before the grid: only the heartbeat speaks
    assert "grid with pixels: 3 cells, 2 already finished, 1 to run" in texts
    assert any(t.startswith("still running breastmnist slow [method] k=1 seed=0 (") for t in texts), texts
