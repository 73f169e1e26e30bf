"""How hica-bench writes and names files: the one atomic-write recipe and the one digest recipe.

- :func:`atomic_write` / :func:`atomic_path`: write to a temporary file with a unique name in the target's own
  folder, flush and fsync it, rename it over the target, then fsync the folder. A reader sees the old file or the
  new one, never a torn one, and two processes writing the same path never share a temporary file. A failed or
  killed write leaves the previous file as it was (a killed one may leave its temporary ``.NAME.*.tmp`` file, which
  :func:`remove_orphans` clears once its writer is gone).
- :func:`atomic_dir`: the same for a folder of files that belong together (an exported model and its record): it is
  filled under a unique temporary name and renamed into place; when another process published it first, that one is
  kept and ours discarded, so a reader never finds the folder missing or half-replaced.
- :func:`digest`: sha256 over canonical JSON, the key of every cache entry and every identity.
- :func:`file_sha256`: a file's content digest, remembered per (path, size, mtime, inode) under a cache folder, so
  a large dataset file is hashed once, not every run; :func:`remembered` / :func:`remember`: any other fact about
  file versions (an encoder's card) kept the same way.
- :func:`read_config`: a user's TOML, YAML or JSON file (a suite, a prompt file) as plain values, or one line saying
  why not.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import json
import reprlib
import stat
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from hica_bench.errors import UserError


def digest(value: Any, length: int | None = None) -> str:
    """sha256 (hex) of ``value`` as canonical JSON (sorted keys, no whitespace; other objects via ``str``);
    the first ``length`` characters when given."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True)
    full = hashlib.sha256(text.encode()).hexdigest()
    return full[:length] if length else full


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's file-creation mask, read without changing it (Linux: /proc/self/status), else by setting and
    restoring it once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()
#: the mode a plain ``open(path, "w")`` gives a new file: what every atomically written file gets (mkstemp's 0600
#: would leave results, leaderboards and reports unreadable to the colleagues and CI jobs they are written for)
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK  #: likewise a plain ``mkdir``'s, for folders published whole (mkdtemp's is 0700)


def _temporary(path: Path) -> Path:
    """A new, unique, empty file beside ``path``: ``.NAME.PID.RANDOM.tmp``, with the mode of the file it replaces, else
    a plain new file's."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            mode = FILE_MODE
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return Path(name)


def cannot_write(path: Path, exc: OSError) -> UserError:
    """The one line for a write that failed: a full disk, no permission, a folder in the way."""
    return UserError(f"cannot write {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write to (by any means: a library that takes a file name); when the
    block ends without an exception the file is fsync'ed and renamed over ``path`` and the folder fsync'ed; on an
    exception it is removed, ``path`` is untouched and the exception goes on as it is (the block knows whether it was
    reading or writing). An OSError of this function's own steps (ENOSPC, EACCES, ...) becomes a
    :class:`~hica_bench.errors.UserError` naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(path)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        _fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise cannot_write(path, exc) from None
    _fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes | str | Callable[[Any], None]) -> Path:
    """Replace ``path`` atomically with ``data``: bytes, text (UTF-8), or a callable that writes to a binary handle; a
    failed write (a full disk, no permission) is a :class:`~hica_bench.errors.UserError` naming ``path``."""
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as handle:
                if callable(data):
                    data(handle)
                else:
                    handle.write(data.encode() if isinstance(data, str) else data)
        except OSError as exc:
            raise cannot_write(path, exc) from None
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yields a new temporary folder beside ``path`` to fill; afterwards it is renamed to ``path``. If ``path``
    already exists (another process published it meanwhile) it is kept and the temporary folder removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
        tmp.chmod(DIR_MODE)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    try:
        yield tmp
    except BaseException:  # the block's own error, as it is
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        _fsync_dir(tmp)
        try:
            os.rename(tmp, path)  # fails when ``path`` exists: the first publisher wins
        except OSError:
            if not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise cannot_write(path, exc) from None
    _fsync_dir(path.parent)


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[int | None]:
    """Holds an advisory ``flock`` on ``path`` (created if missing): released by the kernel when the holder ends,
    however it ends, so a killed process leaves no stale lock. ``wait=False`` raises BlockingIOError when another
    process holds it. Yields the lock file's descriptor, or None where locks are not available (no ``fcntl``, or a
    file system such as some NFS and Lustre mounts that refuses them): then the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield None
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise
        except OSError as exc:  # ENOLCK, EOPNOTSUPP, ENOSYS: this file system keeps no locks
            import logging

            logging.getLogger(__name__).warning("%s cannot be locked here (%s); going on without the lock", path,
                                                exc.strerror or exc)
            yield None
            return
        yield fd
    finally:
        os.close(fd)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


def remove_orphans(folder: Path, name: str) -> None:
    """Remove the temporary files (and folders) :func:`atomic_path` / :func:`atomic_dir` left beside ``folder / name``
    when their writer was killed: those whose writer process no longer runs."""
    for orphan in Path(folder).glob(f".{name}.*.tmp"):
        pid = orphan.name[len(name) + 2:].split(".")[0]
        if pid.isdigit() and not _running(int(pid)):
            if orphan.is_dir():
                shutil.rmtree(orphan, ignore_errors=True)
            else:
                orphan.unlink(missing_ok=True)


_DIGESTS: dict[tuple, str] = {}  #: this process's file digests, per file version
_MEMO_DIR: list[Path] = []  #: the folder file_sha256 remembers digests in when not told (a run's cache folder)


@contextlib.contextmanager
def digests_remembered_in(folder: Path):
    """Inside, :func:`file_sha256` also remembers digests on disk under ``folder`` when its caller names no
    ``memo_dir`` (a run sets its cache folder: encoder weights and dataset files are then read once, not every run)."""
    _MEMO_DIR.append(Path(folder))
    try:
        yield
    finally:
        _MEMO_DIR.pop()


def file_sha256(path: Path, memo_dir: Path | None = None, *, on_disk: bool = True) -> str:
    """sha256 (hex) of a file's bytes, remembered per (absolute path, size, modification time, inode): in this process,
    and on disk under ``memo_dir`` (default: the folder of :func:`digests_remembered_in`, if any) too, so an unchanged
    file is read once; any change to it is a new question. ``on_disk=False``: this process's memory only (a check
    that must read the bytes once per process, e.g. the feature cache's integrity check)."""
    path = Path(path)
    fact = file_version(path)
    version = tuple(fact.values())
    if version in _DIGESTS:
        return _DIGESTS[version]
    folder = (memo_dir if memo_dir is not None else _MEMO_DIR[-1] if _MEMO_DIR else None) if on_disk else None
    known = remembered("digests", fact, folder, "sha256") if folder is not None else None
    if isinstance(known, str):
        return known  # (not put in this process's memory, which holds only digests it read)
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            hasher.update(block)
    value = _DIGESTS[version] = hasher.hexdigest()
    if folder is not None:
        remember("digests", fact, value, folder, "sha256")
    return value


def file_version(path: Path) -> dict[str, Any]:
    """What names one version of a file: absolute path, size, modification time and inode (any change to the file is
    a new version). The key of every memo about a file's content (:func:`file_sha256`, :func:`remembered`)."""
    path = Path(path)
    info = path.stat()
    return {"path": str(path.resolve()), "size": info.st_size, "mtime_ns": info.st_mtime_ns, "inode": info.st_ino}


def _memo_path(kind: str, fact: dict[str, Any], folder: Path | None) -> Path | None:
    folder = folder if folder is not None else _MEMO_DIR[-1] if _MEMO_DIR else None
    return None if folder is None else Path(folder) / kind / f"{digest(fact, 32)}.json"


def remembered(kind: str, fact: dict[str, Any], folder: Path | None = None, field: str = "value") -> Any:
    """The JSON value :func:`remember` stored for exactly ``fact`` under ``folder`` (default: this run's memo folder,
    the folder of :func:`digests_remembered_in`, i.e. the run's cache folder), or None (none stored, unreadable, or
    no folder). ``field``: the key the value is stored under (digests: ``sha256``, as they always were)."""
    path = _memo_path(kind, fact, folder)
    try:
        stored = json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None
    return stored.get(field) if isinstance(stored, dict) and stored.get("fact") == fact else None


def remember(kind: str, fact: dict[str, Any], value: Any, folder: Path | None = None, field: str = "value") -> None:
    """Store the JSON ``value`` for ``fact`` under ``folder`` (default as for :func:`remembered`; nothing without one;
    a read-only cache folder only means it is worked out again next time)."""
    path = _memo_path(kind, fact, folder)
    if path is None:
        return
    try:
        atomic_write(path, json.dumps({"fact": fact, field: value}))
    except UserError:
        pass


def file_sha256_soon(path: Path, memo_dir: Path | None = None) -> Callable[[], str]:
    """Start :func:`file_sha256` of ``path`` in a background thread now; the returned function waits for it and
    gives the digest (or raises what it raised). For a large file needed later while other work (imports, building
    a model) holds this thread: reading and hashing release the GIL, so the digest costs a second core's time instead
    of this one's (a 605 MB checkpoint: ~0.4 s off a run's start on 2 cores)."""
    if memo_dir is None and _MEMO_DIR:
        memo_dir = _MEMO_DIR[-1]  # the caller's context, fixed now: the thread may outlive it
    future: concurrent.futures.Future = concurrent.futures.Future()

    def work() -> None:
        try:
            future.set_result(file_sha256(path, memo_dir, on_disk=memo_dir is not None))
        except BaseException as exc:  # handed to the caller by future.result()
            future.set_exception(exc)

    # a daemon thread: a run that stops on an error before it needs the digest does not wait for it
    threading.Thread(target=work, name="hica-bench-sha256", daemon=True).start()
    return future.result


_FORMATS = {".toml": ".toml", ".yaml": ".yaml", ".yml": ".yaml", ".json": ".json"}
MAX_CONFIG_BYTES = 1 << 20  #: a suite or prompt file (a paper's grid, a dataset's prompts) is far smaller
MAX_CONFIG_DEPTH = 16  #: how deep a suite or prompt file's values may nest (they need 3 levels)


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters without building the whole text first (reprlib): a message
    never echoes an unbounded value (a 200,000-character name, a YAML alias bomb's expansion)."""
    bounded = reprlib.Repr()
    bounded.maxlevel, bounded.maxdict, bounded.maxlist, bounded.maxtuple, bounded.maxset = 3, 4, 4, 4, 4
    bounded.maxstring = bounded.maxother = limit
    bounded.maxlong = 40
    shown = bounded.repr(value)
    return shown if len(shown) <= limit + 10 else shown[:limit] + "..."


def read_regular(path: Path, where: str, limit: int | None = None) -> bytes:
    """The bytes of ``path`` when it is a regular file (after links) of at most ``limit`` bytes; else a one-line
    :class:`UserError` starting with ``where``. Opened without blocking, so a FIFO, a device or a socket (or a link to
    one, such as ``/dev/urandom``) is refused instead of hanging the command or filling its memory."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode) and not Path(path).is_dir():  # a socket cannot even be opened
            raise UserError(f"{where}: is not a regular file (a FIFO, device or socket); give a file")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{where}: is a folder, not a file") from None
    except OSError as exc:
        raise UserError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise UserError(f"{where}: is a folder, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{where}: is not a regular file (a FIFO, device or socket); give a file")
        if limit is not None and info.st_size > limit:
            raise UserError(f"{where}: is {info.st_size:,} bytes, more than the {limit:,} such a file may have")
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            size += len(chunk)
            if limit is not None and size > limit:  # a file that grows while it is read
                raise UserError(f"{where}: is more than the {limit:,} bytes such a file may have")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise UserError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def _depth(value: Any, limit: int, _memo: dict[int, int] | None = None) -> int:
    """How deep ``value`` nests (lists and dicts), counted no further than ``limit`` + 1. Each object is measured once
    (a YAML alias bomb shares its lists: walking every path would take billions of steps)."""
    if not isinstance(value, (dict, list)):
        return 0
    memo = {} if _memo is None else _memo
    if id(value) not in memo:
        memo[id(value)] = limit + 1  # a container that contains itself is as deep as the limit allows
        if limit >= 0:
            items = value.values() if isinstance(value, dict) else value
            memo[id(value)] = min(limit + 1, 1 + max((_depth(item, limit - 1, memo) for item in items), default=0))
    return memo[id(value)]


class _UniqueKeyLoader:
    """A YAML safe loader that refuses a key given twice in one mapping (TOML refuses it too; YAML would keep the last
    value silently)."""

    @staticmethod
    @functools.cache
    def make():
        import yaml

        class Loader(yaml.SafeLoader):
            def construct_mapping(self, node, deep=False):
                seen = set()
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=deep)
                    try:
                        duplicate = key in seen
                    except TypeError:  # an unhashable key: the base loader says so
                        break
                    if duplicate:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"the key {short(key, 40)} is given twice", key_node.start_mark)
                    seen.add(key)
                return super().construct_mapping(node, deep=deep)

        return Loader


def read_config(path: Path, where: str, suffixes: tuple[str, ...]) -> Any:
    """The TOML, YAML or JSON file ``path`` as plain Python values (by its suffix, one of ``suffixes``); a missing,
    unreadable or malformed file is a one-line :class:`UserError` starting with ``where``. YAML is read with
    ``safe_load`` (no Python objects)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{where}: is a folder, not a {' or '.join(sorted({_FORMATS[s] for s in suffixes}))} file")
    try:
        text = read_regular(path, where, MAX_CONFIG_BYTES).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: cannot be read ({exc})") from None
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        allowed = ", ".join(suffixes[:-1]) + f" or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0]
        raise UserError(f"{where}: unknown format {suffix or '(no suffix)'!r}; use {allowed}")
    try:
        value = _parse(text, suffix, where)
    except RecursionError:
        value = None
        deep = True
    else:
        deep = _depth(value, MAX_CONFIG_DEPTH) > MAX_CONFIG_DEPTH
    if deep:
        raise UserError(f"{where}: nests values deeper than {MAX_CONFIG_DEPTH} levels; suite and prompt files need 3")
    return value


def _parse(text: str, suffix: str, where: str) -> Any:
    if suffix == ".toml":
        import sys

        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{where}: not valid TOML ({short(str(exc), 200)[1:-1]})") from None
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    import yaml

    try:
        return yaml.load(text, Loader=_UniqueKeyLoader.make())  # safe: a SafeLoader that also refuses duplicate keys
    except yaml.YAMLError as exc:
        raise UserError(f"{where}: not valid YAML ({' '.join(str(exc).split())[:300]})") from None
