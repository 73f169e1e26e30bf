"""What a run shows on a pipe: timestamped log lines, and nothing with --quiet (split from
tests/system/test_progress.py)."""

from __future__ import annotations

import re

from conftest import TEST_PLUGINS, invoke

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "  # as in tests/system/test_progress.py


def test_a_pipe_gets_log_lines_and_quiet_nothing(medmnist_root, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))
    args = ["-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets", "breastmnist", "--methods", "prototype",
            "--shots", "1,2", "--seeds", "0,1", "--data-root", medmnist_root, "--cache-dir", tmp_path / "cache",
            "--backend", "eager", "--batch-size", "64", "--threads", "2", "--no-channels-last"]
    code, out, err = invoke(*args, "--out", tmp_path / "pipe")  # stdout and stderr are no terminal here
    assert code == 0, err
    assert "\x1b[" not in err and "\x1b[" not in out  # no control codes in a log
    lines = err.splitlines()
    assert all(re.match(STAMP, line) for line in lines), lines
    assert lines[-1][20:].startswith("cells 4/4: 4 ok, 0 not applicable, 0 failed (last: breastmnist prototype k=2 ")

    code, out, err = invoke(*args, "--out", tmp_path / "quiet", "--quiet")
    assert code == 0 and err == "", err
    assert "4 ran ok" in " ".join(out.split())
