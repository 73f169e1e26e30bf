"""Fault injection for the crash-safety tests (``hica-bench -p crash_points``): this process SIGKILLs
itself at the point named by ``$HICA_TEST_KILL_AT``, exactly as an outside ``kill -9`` landing there would.

``NAME:N`` picks the N-th occurrence (from 1) of:

- ``encode``: an image-encoder batch of the ``pixels`` test encoder (mid feature extraction)
- ``cache-npy``: a feature-cache array write; its temporary file is left cut to half its size
- ``cache-meta``: a feature-cache array just moved into place, before its JSON entry is written
- ``cache-json``: a feature-cache JSON write; its temporary file is left cut to half its size
- ``results``: a ``results.jsonl`` append; only the first half of the record line is written

``$HICA_TEST_SLOW_RESULTS=SECONDS`` sleeps before every results append, so an outside killer has time to
land between (or inside) appends. The core runs unchanged; only ``os.write`` / ``os.fsync`` /
``os.replace`` are wrapped, and only for the files named above.
"""

import os
import re
import signal
import time

import pixel_encoder

POINT, _, NTH = os.environ.get("HICA_TEST_KILL_AT", "").partition(":")
NTH = int(NTH or 1)
SLOW_RESULTS = float(os.environ.get("HICA_TEST_SLOW_RESULTS", "0"))
_seen: dict[str, int] = {}
_write, _fsync, _replace = os.write, os.fsync, os.replace


def _reached(point: str) -> bool:
    _seen[point] = _seen.get(point, 0) + 1
    return point == POINT and _seen[point] == NTH


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def write(fd, data):
    if _path(fd).endswith("results.jsonl"):
        time.sleep(SLOW_RESULTS)
        if _reached("results"):
            _write(fd, bytes(data)[: len(data) // 2])
            _die()
    return _write(fd, data)


def fsync(fd):
    match = re.search(r"/features/\.[0-9a-f]{64}\.(npy|json)\.\d+\.\w+\.tmp$", _path(fd))
    if match and _reached(f"cache-{match.group(1)}"):
        os.ftruncate(fd, os.fstat(fd).st_size // 2)
        _die()
    return _fsync(fd)


def replace(src, dst, *args, **kwargs):
    _replace(src, dst, *args, **kwargs)
    if re.search(r"/features/[0-9a-f]{64}\.npy$", str(dst)) and _reached("cache-meta"):
        _die()


def _encode(self, images, _original=pixel_encoder.PixelEncoder.encode):
    if _reached("encode"):
        _die()
    return _original(self, images)


os.write, os.fsync, os.replace = write, fsync, replace
pixel_encoder.PixelEncoder.encode = _encode
