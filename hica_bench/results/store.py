"""The JSONL results store (append-only, resumable), reading several results files, and merging shards.

One JSON object per line, one line per finished cell. A line is written with a single ``write`` on a file opened
for appending and then fsync'ed, so a killed run leaves at most one truncated last line: :meth:`ResultsStore.load`
skips it and the next append cuts it off before writing (it was never a finished cell).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hica_bench.errors import UserError
from hica_bench.files import file_lock, read_regular
from hica_bench.results.codec import jsonable
from hica_bench.results.schema import SCHEMA_VERSION, CellResult, Status

log = logging.getLogger(__name__)

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


_HELD: dict[Path, int] = {}  #: the --out folders whose lock this process holds, with how deep it is nested


@contextlib.contextmanager
def out_lock(out_dir: Path, command: str = "run"):
    """Holds ``out_dir``'s lock (:func:`hica_bench.files.file_lock`) while results are written there (``command``:
    ``run`` or ``merge``): a second run on the same ``--out`` would compute the same pending cells again and append them
    twice, and a merge beside a run (or another merge) would rewrite the file under it and lose records, so each is
    refused with one line naming the command that holds the lock. Re-entrant within a process: the CLI holds it across
    a run and its publishing, and the run loop takes it again inside."""
    path = Path(out_dir) / ".hica-bench.lock"
    key = path.resolve()
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    try:
        with file_lock(path, wait=False) as fd:
            if fd is not None:
                with contextlib.suppress(OSError):  # only for the message below (a full disk must not stop here)
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()} {command}".encode(), 0)
            _HELD[key] = 1
            try:
                yield
            finally:
                _HELD.pop(key, None)
    except BlockingIOError:
        holder = path.read_text(errors="replace")[:64].split() if path.is_file() else []
        pid = holder[0] if holder and holder[0].isdigit() else "?"
        other = holder[1] if len(holder) > 1 and holder[1] in ("run", "merge") else "run"
        raise UserError(f"another hica-bench {other} (pid {pid}) is writing to {out_dir}; wait for it to finish "
                        "(then rerun: finished cells are kept) or use another --out") from None


class ResultsStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, CellResult]:
        """The newest result per ``cell_id``, in file order. A last line without its newline is a write a kill cut
        short and is ignored, unless it is a whole record (then it counts, and :meth:`append` keeps it). Any other line
        that is not a result of a schema this version reads is a UserError naming the line: nothing is ever dropped
        silently, and nothing is computed before the file has been read."""
        results: dict[str, CellResult] = {}
        for number, record in self._records():
            result = self._result(number, record)
            results.pop(result.cell_id, None)  # the newest record of a cell counts, at its place in the file
            results[result.cell_id] = result
        return results

    def _read(self) -> bytes:
        if self.path.is_dir():
            raise UserError(f"results file {self.path} is a folder")
        if not self.path.exists():
            return b""
        return read_regular(self.path, f"results file {self.path}")  # a FIFO or device is refused, not waited on

    def _records(self) -> list[tuple[int, dict[str, Any]]]:
        lines = self._read().split(b"\n")
        last = lines.pop()  # the bytes after the last newline (b"" when the file ends with one)
        found = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                found.append((number, self._parse(number, line)))
        if last.strip():
            record = _whole_record(last)
            if record is None:
                log.warning("%s:%d is a record a killed write cut short; ignoring it", self.path, len(lines) + 1)
            else:
                found.append((len(lines) + 1, record))
        return found

    def _parse(self, number: int, line: bytes) -> dict[str, Any]:
        where = f"{self.path}:{number}"
        try:
            record = json.loads(line.decode("utf-8"))
            if _SURROGATE_ESCAPE.search(line):  # a \udXXX escape: text that may not be writable back as UTF-8
                json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeError:
            raise UserError(f"{where} is not UTF-8 text; repair or delete that line") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{where} is not valid JSON ({exc.msg}, column {exc.colno}); repair or delete that line") from None
        except (ValueError, RecursionError) as exc:  # a number of thousands of digits, nesting thousands deep
            raise UserError(f"{where} is not a result record JSON can read back ({type(exc).__name__}); repair or "
                            "delete that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("schema_version"), int) or record["schema_version"] < 1:
            raise UserError(f"{where} is not a hica-bench result record")
        return record

    def _result(self, number: int, record: dict[str, Any]) -> CellResult:
        version = record["schema_version"]
        if version > SCHEMA_VERSION:
            raise UserError(f"{self.path} was written by a newer hica-bench (schema {version} > {SCHEMA_VERSION}); "
                            "upgrade hica-bench or use another --out")
        try:
            return CellResult.from_record(record)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise UserError(f"{self.path}:{number} does not match result schema {version} ({exc})") from None

    def whole_lines(self) -> bytes:
        """The file's bytes up to its last whole record, each line ending with a newline (a last line a killed write
        cut short is left out, as :meth:`load` leaves it out)."""
        data = self._read()
        head, _, last = data.rpartition(b"\n")
        head = head + b"\n" if head or data.startswith(b"\n") else b""
        if last.strip() and _whole_record(last) is not None:
            head += last + b"\n"
        return head

    def check_writable(self) -> None:
        """Before any work: the file can be appended to (not a folder, not read-only)."""
        if self.path.is_dir():
            raise UserError(f"results file {self.path} is a folder")
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise UserError(f"cannot write {self.path}: it is read-only")

    def append(self, result: CellResult) -> None:
        """``result`` appended as one line, and fsync'ed. The line is read back first as :meth:`load` will read it: a
        record that would not read back (a plugin's value the schema cannot hold) is written as the cell's failure with
        the reason instead, so the file never holds a line that stops every later command."""
        result.finished_at = result.finished_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
        line = (result.to_json() + "\n").encode()
        problem = _unreadable(line)
        if problem is not None:  # the cell's failure: its identity, where and when it ran, and why, nothing else
            result = CellResult(result.key, result.identity, Status.FAILED, environment=result.environment,
                                finished_at=result.finished_at,
                                reason=f"the cell's record could not be written as it was ({problem})")
            line = (result.to_json() + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                whole = _whole_lines_size(self.path, size)
                if whole != size:  # the last line has no newline: a whole record keeps it, a cut-short write goes
                    tail = os.pread(fd, size - whole, whole)
                    if _whole_record(tail) is None:
                        os.ftruncate(fd, whole)
                        size = whole
                    else:
                        line = b"\n" + line
                try:
                    written = 0
                    while written < len(line):  # a nearly full disk may take part of the line and refuse the rest
                        count = os.write(fd, line[written:])
                        if count <= 0:
                            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                        written += count
                    os.fsync(fd)
                except OSError:  # a full disk may have taken part of the line: leave the file as it was
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)
        except OSError as exc:
            raise UserError(f"cannot write {self.path}: {exc.strerror or exc}") from None


def _unreadable(line: bytes) -> str | None:
    """Why ``line`` would not read back as a result record (:meth:`ResultsStore.load`), or None."""
    try:
        CellResult.from_record(json.loads(line.decode("utf-8")))
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, UnicodeError) as exc:
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return None


def _whole_record(line: bytes) -> dict[str, Any] | None:
    """``line`` as a result record when it is one whole (parses as a JSON object with a schema version), else None."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeError, ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None
    return record if isinstance(record, dict) and isinstance(record.get("schema_version"), int) else None


def read_many(paths: list[Path]) -> list[CellResult]:
    """The results of several results files (or folders holding a ``results.jsonl``), in order. A cell (same identity)
    found in two of them is refused with one line naming both: merging must never pick one of two results silently."""
    return [result for result, _ in read_many_with_files(paths)]


def results_files(paths: list[Path]) -> list[Path]:
    """The results files ``paths`` name (a folder stands for its ``results.jsonl``); a missing one or one given twice is
    a UserError."""
    files: list[Path] = []
    for given in paths:
        path = Path(given) / "results.jsonl" if Path(given).is_dir() else Path(given)
        if not path.is_file():
            raise UserError(f"results {str(given)!r} is neither a results file nor a folder holding results.jsonl")
        if path.resolve() in {f.resolve() for f in files}:
            raise UserError(f"{path} is given twice")
        files.append(path)
    return files


def read_many_with_files(paths: list[Path]) -> list[tuple[CellResult, Path]]:
    """:func:`read_many`, each result with the results file it came from (its saved predictions are relative to that
    file's folder)."""
    found: dict[str, tuple[CellResult, Path]] = {}
    for path in results_files(paths):
        for cell_id, result in ResultsStore(path).load().items():
            if cell_id in found:
                other = found[cell_id][1]
                k = result.key
                raise UserError(f"{k.dataset} {k.method} k={k.k} seed={k.seed} ({k.encoder}) is in both {other} and "
                                f"{path}; merge results files that hold different cells")
            found[cell_id] = (result, path)
    return list(found.values())


#: What a cell computed (besides how long it took, where and when): two records of one cell that agree on these are
#: the same result, recorded twice.
OUTCOME = ("status", "metrics", "per_class", "calibration", "fit_info", "n_support", "n_test", "components_used")


def _outcome(result: CellResult) -> str:
    return json.dumps(jsonable({name: getattr(result, name) for name in OUTCOME}), sort_keys=True, allow_nan=True)


@dataclass
class Merged:
    """What :func:`merge_shards` found: the one record that counts per cell, what the merged file holds, and every
    record that does not go into it, with why."""

    results: list[CellResult]  #: one per cell, the one that counts
    kept: bytes  #: the target file's own lines, kept as they were (its history included); empty for a new file
    appended: list[CellResult]  #: the records to write after ``kept``
    dropped: dict[str, int] = field(default_factory=dict)  #: why -> how many records are not carried over
    history: int = 0  #: earlier records of re-run cells (``--force``) in the target, kept in place

    @property
    def text(self) -> str:
        """The merged results file: the target's own lines, then the new records."""
        return self.kept.decode("utf-8") + "".join(r.to_json() + "\n" for r in self.appended)


DUPLICATE = "the same outcome is recorded in another of the files (kept once)"
SUPERSEDED = "a failed or unfinished record whose cell finished in another of the files"


def merge_shards(paths: list[Path], out_dir: Path) -> Merged:
    """The results of several results files (``run --shard`` writes one per shard; or folders holding one) merged
    into ``out_dir``'s ``results.jsonl``. A cell recorded in more than one of them is kept once when the records agree
    on what it computed (:data:`OUTCOME`; timings, machine and time may differ), and a finished record beats a failed
    one; two finished records that disagree are refused with one line naming both files, so a merge never picks one
    of two different numbers. When the target file is one of ``paths`` its lines stay as they are (earlier records of
    a re-run cell included) and the merge only appends to it; every record left out is counted with its reason.
    Saved predictions of the other files are re-pointed to be relative to ``out_dir``."""
    target = (Path(out_dir) / "results.jsonl").resolve()
    found: dict[str, tuple[CellResult, Path]] = {}
    merged = Merged([], b"", [])
    for path in results_files(paths):
        store = ResultsStore(path)
        if path.resolve() == target:
            merged.kept = store.whole_lines()
            records = len(store._records())
            loaded = store.load()
            merged.history = records - len(loaded)
            found.update({cell_id: (result, path) for cell_id, result in loaded.items()})
            continue
        for cell_id, result in store.load().items():
            if result.predictions:
                result.predictions = os.path.relpath(path.parent / result.predictions, out_dir)
            if cell_id not in found:
                found[cell_id] = (result, path)
                continue
            kept, other = found[cell_id]
            if kept.status.finished and result.status.finished and _outcome(kept) != _outcome(result):
                k = result.key
                raise UserError(f"{k.dataset} {k.method} k={k.k} seed={k.seed} ({k.encoder}) has different results in "
                                f"{other} and {path} (same identity, different outcome); keep one of them")
            if result.status.finished and not kept.status.finished:  # a retry that finished beats the failure
                found[cell_id] = (result, path)
                merged.dropped[SUPERSEDED] = merged.dropped.get(SUPERSEDED, 0) + 1
            else:
                reason = DUPLICATE if result.status.finished or not kept.status.finished else SUPERSEDED
                merged.dropped[reason] = merged.dropped.get(reason, 0) + 1
    merged.results = [result for result, _ in found.values()]
    merged.appended = [result for result, path in found.values() if path.resolve() != target]
    return merged


def _whole_lines_size(path: Path, size: int) -> int:
    """Bytes of ``path``'s first ``size`` bytes up to and including their last newline (0 if none)."""
    with path.open("rb") as handle:
        end = size
        while end > 0:
            start = max(0, end - (1 << 16))
            handle.seek(start)
            cut = handle.read(end - start).rfind(b"\n")
            if cut >= 0:
                return start + cut + 1
            end = start
    return 0


