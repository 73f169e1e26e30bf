"""Start-up: the cyclic garbage collector paused while libraries are imported.

Importing torch, open_clip, scikit-learn and pandas leaves ~0.3 million objects that the collector tracks (modules,
classes, functions) and that live as long as the process. CPython runs a full collection each time the objects that
survived grow by a quarter, so during those imports it walks the growing heap again and again and frees next to
nothing: measured on the 2-core VM, ``import_open_clip(); import sklearn.metrics, pandas`` ran 5 full collections
(0.37 s, 153 objects freed) and 0.11 s of young ones; it takes 3.2-3.5 s with the collector on and 2.5-2.9 s with it
paused, and a fresh-cache zero-shot run spends ~0.8 s less before its first image is encoded.

:func:`collection_paused` wraps the blocks that import (the CLI's commands, the plugin registry, a plugin's
``build``/``describe``, scikit-learn for the metrics). Reference counting frees objects as usual inside; only cycles
wait, and the collector runs again, as configured, when the block ends. Nothing is frozen, so a long run collects as
before. The collector's switch is the process's, not a thread's: while one thread is inside a block, no thread's
cycles are collected, and the first block to end switches it back on. A process forked inside a block gets the
collector back on in the child.
"""

from __future__ import annotations

import contextlib
import gc
import os
from typing import Iterator

_paused = False  #: whether a block of this module switched the collector off (and has not switched it back yet)


def _after_fork_in_child() -> None:
    global _paused
    if _paused:
        _paused = False
        gc.enable()


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """No cyclic garbage collection inside (a block that imports libraries); as before after it. Nested blocks and a
    process that runs with the collector disabled are left as they are."""
    global _paused
    if not gc.isenabled():
        yield
        return
    gc.disable()
    _paused = True
    try:
        yield
    finally:
        _paused = False
        gc.enable()
