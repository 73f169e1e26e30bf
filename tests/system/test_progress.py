"""What a run shows while it works: a live display on a terminal (a real pseudo-terminal here), timestamped log lines
with a heartbeat elsewhere, nothing with --quiet."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import time

from conftest import TEST_PLUGINS
from hica_bench.progress import LogEvents

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


def _on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """``hica-bench ARGS`` with stdout and stderr on a pseudo-terminal: (exit code, everything it wrote)."""
    main, child = pty.openpty()
    process = subprocess.Popen(["hica-bench", *args], stdin=subprocess.DEVNULL, stdout=child, stderr=child, env=env)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    return process.wait(timeout=120), b"".join(chunks).decode("utf-8", "replace")


def test_a_terminal_gets_a_live_display(medmnist_root, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TEST_PLUGINS), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "120"}
    args = ["-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets", "breastmnist", "--methods", "prototype",
            "--shots", "1,2", "--seeds", "0,1", "--data-root", str(medmnist_root), "--cache-dir", str(tmp_path / "cache"),
            "--backend", "eager", "--batch-size", "64", "--threads", "2", "--no-channels-last"]
    code, shown = _on_a_terminal([*args, "--out", str(tmp_path / "tty")], env)
    assert code == 0, shown
    assert "\x1b[2K" in shown and "pixels: cells (0 already finished)" in shown  # redrawn in place, then cleared
    assert re.search(r"4/4", shown) and "4 ran ok" in re.sub(r"\x1b\[[0-9;]*m", "", shown)
    assert not re.search(STAMP, shown)  # no log lines on a terminal


def test_decoding_a_folder_is_shown_on_a_terminal_and_announced_in_a_log(medmnist_root, tmp_path):
    """A folder dataset's decoding (a plugin's counted step, ``hica_bench.data.progress``) is a bar on a terminal and,
    in a log, what the heartbeat names while it runs."""
    import numpy as np
    from PIL import Image

    with np.load(medmnist_root / "breastmnist.npz") as npz:
        for split in ("train", "test"):
            for i, (x, y) in enumerate(zip(npz[f"{split}_images"][:30], npz[f"{split}_labels"][:30, 0])):
                path = tmp_path / "data" / split / str(y) / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(x).save(path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TEST_PLUGINS), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "160"}
    args = ["-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets", f"folder:root={tmp_path / 'data'}",
            "--methods", "prototype", "--shots", "1", "--seeds", "0", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "tty")]
    code, shown = _on_a_terminal(args, env)
    assert code == 0, shown
    assert "data: decoding 60 images at 28 px" in re.sub(r"\x1b\[[0-9;]*m", "", shown)

    log = io.StringIO()
    with LogEvents(log, heartbeat=0.2) as events:
        advance = events.task("data: decoding 60 images at 28 px", 60)
        advance(10)
        deadline = time.monotonic() + 30
        while "still data: decoding 60 images" not in log.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "still data: decoding 60 images at 28 px (60)" in log.getvalue()
