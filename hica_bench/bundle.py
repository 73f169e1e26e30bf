"""Results bundles: one file to share a results folder with, checked member by member when it is imported.

A bundle is a gzip-compressed tar of regular files only, in this order::

    manifest.json                  what the bundle holds (below); always the first member
    results.jsonl                  one record per cell (the one that counts, as ``merge`` picks it), current schema
    suite/NAME                     the suite file given to ``export --suite`` (a run does not record its suite)
    prompts/SHA12/NAME             each prompt file a record's dataset names (``DATASET:prompts=FILE``), under the first
                                   12 hex digits of its sha256
    predictions/CELL_ID.npz        each saved predictions file (``run --save-predictions``); the record's ``predictions``
                                   names it, relative to ``results.jsonl``, as a run writes it

``manifest.json`` holds the bundle format (``format``, ``bundle_version``), the results schema
(:data:`hica_bench.results.SCHEMA_VERSION`), the hica-bench version and creation time of the export, the number of
cells, the suite's member, each prompt file's member with the path the records name it by, and every other member's
path, size and sha256.

:func:`export` writes one atomically (deterministic member order, fixed owners and modes, and with
``SOURCE_DATE_EPOCH`` set, fixed times: two exports of the same results are then byte-identical). :func:`opened` reads
one and checks *everything* before anything is written (a bad bundle writes nothing): regular-file members only, safe
names in the layout above, no duplicates, manifest and members matching one to one with size and sha256, a format and
schema this hica-bench reads, every record's predictions file present, the gzip stream whole to its last byte, and the
limits below. :func:`import_into` then merges its records into a folder by the rules of ``hica-bench merge``
(:func:`hica_bench.results.merge_shards`) and writes its files there, each atomically, never outside that folder.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from hica_bench import __version__
from hica_bench.errors import UserError
from hica_bench.files import MAX_CONFIG_BYTES, atomic_path, atomic_write, cannot_write, read_regular, short
from hica_bench.results import SCHEMA_VERSION, CellResult, Merged, ResultsStore, merge_shards, results_files

FORMAT = "hica-bench-bundle"  #: the manifest's ``format``
BUNDLE_VERSION = 1  #: the layout and manifest this hica-bench writes and reads
MANIFEST = "manifest.json"
RESULTS = "results.jsonl"

# Limits on what a bundle may hold (every size its maker controls). Generous: a paper's full grid with predictions is
# far smaller; a bundle past them is refused with one line before anything is written.
MAX_MEMBERS = 100_000  #: members, the manifest included
MAX_MEMBER_BYTES = 1 << 30  #: one member (a results file, a predictions file), uncompressed
MAX_TOTAL_BYTES = 4 << 30  #: all members together, uncompressed
MAX_MANIFEST_BYTES = 64 << 20  #: manifest.json
MAX_SMALL_BYTES = MAX_CONFIG_BYTES  #: a suite or prompt file (what a run reads of them)
#: one part of a member's name (between slashes), UTF-8: room left under the file system's 255 for the temporary name
#: an atomic write gives it (``.NAME.PID.RANDOM.tmp``)
MAX_NAME_BYTES = 200
MAX_HEADERS_BYTES = 64 << 20  #: the tar headers' extended (PAX) records of all members together
MAX_HEADER_BYTES = 1 << 20  #: one tar header (a long name's extended header included)
#: the decompressed tar stream as a whole: the members, their headers and the end-of-archive padding
MAX_STREAM_BYTES = MAX_TOTAL_BYTES + (MAX_MEMBERS + 8) * 4096
_CHUNK = 1 << 20

_OPTION_START = re.compile(r":(?=[A-Za-z_][\w.-]*=)")  #: where an option starts in a label (as the registry parses it)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA12 = re.compile(r"[0-9a-f]{12}")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")


# --------------------------------------------------------------------------------------------------- names and layout
def _part_problem(part: str) -> str | None:
    if part in ("", ".", ".."):
        return "has an empty, '.' or '..' part" if part else "has an empty part"
    if _UNSAFE.search(part):
        return "holds a control character or a backslash"
    try:
        part.encode("utf-8")
    except UnicodeError:
        return "is not UTF-8 text"
    if len(part.encode("utf-8")) > MAX_NAME_BYTES:
        return f"has a part longer than {MAX_NAME_BYTES} bytes"
    return None


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a member of a bundle (None: it can): an absolute name, a ``..`` (or ``.`` or empty) part,
    a backslash or control character, an over-long part, or a place outside the layout (module docstring)."""
    if not name or name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return "is an absolute path" if name else "is empty"
    parts = name.split("/")
    for part in parts:
        problem = _part_problem(part)
        if problem:
            return problem
    if name in (MANIFEST, RESULTS):
        return None
    if len(parts) == 2 and parts[0] in ("predictions", "suite"):
        return None
    if len(parts) == 3 and parts[0] == "prompts" and _SHA12.fullmatch(parts[1]):
        return None
    return ("is outside a bundle's layout (manifest.json, results.jsonl, suite/NAME, prompts/SHA12/NAME, "
            "predictions/NAME)")


def _safe_part(path: Path, stem: str) -> str:
    """``path``'s name as one part of a member's name, or ``stem`` with its suffix where it cannot be one."""
    suffix = path.suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", path.suffix) else ""
    return path.name if _part_problem(path.name) is None else stem + suffix


def prompt_file_of(result: CellResult) -> str | None:
    """The prompt file a record's dataset names (``DATASET:prompts=FILE``, as given to the run), when the run read one
    (its origin holds the file's digest); else None."""
    if result.identity is None or result.identity.origin.prompts is None:
        return None
    for part in _OPTION_START.split(result.key.dataset)[1:]:
        key, _, value = part.partition("=")
        if key == "prompts" and value:
            return value
    return None


def _label(result: CellResult) -> str:
    k = result.key
    return f"{k.dataset} {k.method} k={k.k} seed={k.seed} ({k.encoder})"


# --------------------------------------------------------------------------------------------------------- export
@dataclass
class Exported:
    """What :func:`export` wrote."""

    path: Path
    cells: int
    predictions: int  #: saved predictions files
    prompt_files: list[str]  #: their members
    suite: str | None  #: its member
    size: int  #: the bundle's bytes


@dataclass
class _Source:
    """A member of a bundle being written: its bytes, or the file they are read from."""

    name: str
    size: int
    sha256: str
    data: bytes | None = None
    path: Path | None = None


def _open_regular(path: Path, where: str) -> BinaryIO:
    """``path`` opened for reading when it is a regular file (after links); a FIFO, device, socket or folder is refused
    with one line, without blocking on it."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise UserError(f"{where}: is not a regular file (a folder, FIFO, device or socket)")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except OSError as exc:
        raise UserError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    handle = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):  # replaced between the two looks
        handle.close()
        raise UserError(f"{where}: is not a regular file (a folder, FIFO, device or socket)")
    return handle


def _file_source(name: str, path: Path, where: str) -> _Source:
    """A member read from ``path`` (hashed now, added later; checked then to be unchanged)."""
    hasher, size = hashlib.sha256(), 0
    with _open_regular(path, where) as handle:
        try:
            if os.fstat(handle.fileno()).st_size > MAX_MEMBER_BYTES:
                raise UserError(f"{where}: is more than the {MAX_MEMBER_BYTES:,} bytes a bundle's member may have")
            for block in iter(lambda: handle.read(_CHUNK), b""):
                size += len(block)
                if size > MAX_MEMBER_BYTES:
                    raise UserError(f"{where}: is more than the {MAX_MEMBER_BYTES:,} bytes a bundle's member may have")
                hasher.update(block)
        except OSError as exc:
            raise UserError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    return _Source(name, size, hasher.hexdigest(), path=path)


def _bytes_source(name: str, data: bytes) -> _Source:
    return _Source(name, len(data), hashlib.sha256(data).hexdigest(), data=data)


def _created(created: datetime | None) -> datetime:
    if created is not None:
        return created.astimezone(timezone.utc).replace(microsecond=0)
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch:
        try:
            return datetime.fromtimestamp(int(epoch), timezone.utc)
        except (ValueError, OverflowError, OSError):
            raise UserError(f"SOURCE_DATE_EPOCH must be a time in whole seconds since 1970, got {short(epoch)}") from None
    return datetime.now(timezone.utc).replace(microsecond=0)


class _HashingReader:
    """A file read for a tar member, hashed as it is read (to check it is still the file that was hashed before)."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.hasher = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.hasher.update(data)
        return data


def export(results: list[Path], target: Path, *, suite: Path | None = None, prompts_from: Path | None = None,
           created: datetime | None = None) -> Exported:
    """Write the bundle of ``results`` (results files, or folders holding one) to ``target``, atomically.

    Several results files are combined by the rules of ``hica-bench merge`` (a cell recorded twice with the same
    outcome once, a finished record before a failed one, two different outcomes refused); the bundle holds the record
    that counts per cell. Every saved predictions file a record names must be there, and every prompt file a record's
    dataset names (a relative path is taken from ``prompts_from``, default the current folder: where the run was
    started); ``suite`` is added when given. ``created``: the manifest's time [default: ``$SOURCE_DATE_EPOCH``, else
    now]; it is also every member's modification time."""
    files = results_files(results)
    # merge_shards re-points saved predictions relative to the folder it merges into: a folder that never exists and
    # is no results folder, so the records all count as new and their files can be found from it again
    anchor = Path(os.path.abspath(os.sep)) / f".hica-bench-export-{uuid.uuid4().hex}"
    merged = merge_shards(files, anchor)
    if not merged.results:
        raise UserError(f"{', '.join(map(str, results))} hold no results")
    when = _created(created)
    sources: list[_Source] = []
    for result in merged.results:
        if result.predictions:
            path = Path(os.path.normpath(os.path.join(anchor, result.predictions)))
            name = f"predictions/{_safe_part(path.with_name(result.cell_id + path.suffix), result.cell_id)}"
            sources.append(_file_source(name, path, f"saved predictions {path} of {_label(result)} (export needs every "
                                                    "predictions file its records name)"))
            result.predictions = name
    prompt_members: dict[str, dict[str, Any]] = {}
    read_paths: list[Path] = [Path(suite)] if suite is not None else []  #: files read whole (not in a source's path)
    for result in merged.results:
        given = prompt_file_of(result)
        if given is None:
            continue
        path = Path(given).expanduser()
        if not path.is_absolute():
            path = Path(prompts_from if prompts_from is not None else Path.cwd()) / path
        where = f"prompt file {given!r} of dataset {result.key.dataset}"
        if not path.exists():
            raise UserError(f"{where}: not found at {path}; export from the folder the run was started in, or give "
                            "that folder as --prompts-from")
        data = read_regular(path, where, MAX_SMALL_BYTES)
        read_paths.append(path)
        name = f"prompts/{hashlib.sha256(data).hexdigest()[:12]}/{_safe_part(path, 'prompts')}"
        if name not in prompt_members:
            prompt_members[name] = {"path": name, "given_as": given, "datasets": []}
            sources.append(_bytes_source(name, data))
        if result.key.dataset not in prompt_members[name]["datasets"]:
            prompt_members[name]["datasets"].append(result.key.dataset)
    suite_member = None
    if suite is not None:
        suite_member = f"suite/{_safe_part(Path(suite), 'suite')}"
        sources.append(_bytes_source(suite_member, read_regular(Path(suite), f"suite {suite}", MAX_SMALL_BYTES)))
    sources.append(_bytes_source(RESULTS, "".join(r.to_json() + "\n" for r in merged.results).encode("utf-8")))
    written = Path(os.path.realpath(target))
    for source in sources:  # `export out/ --out out/results.jsonl` would replace what it reads
        if source.path is not None and Path(os.path.realpath(source.path)) == written:
            raise UserError(f"--out {target} is a file the bundle is made of; write the bundle elsewhere")
    if written in {Path(os.path.realpath(f)) for f in [*files, *read_paths]}:
        raise UserError(f"--out {target} is a results file the bundle is made of; write the bundle elsewhere")
    order = {"results.jsonl": 0, "suite": 1, "prompts": 2, "predictions": 3}
    sources.sort(key=lambda s: (order[s.name.split("/")[0]], s.name))
    if len(sources) + 1 > MAX_MEMBERS:
        raise UserError(f"{len(sources) + 1:,} members are more than the {MAX_MEMBERS:,} a bundle may hold; export "
                        "fewer results per bundle")
    total = sum(s.size for s in sources)
    if total > MAX_TOTAL_BYTES - MAX_MANIFEST_BYTES:
        raise UserError(f"{total:,} bytes are more than the {MAX_TOTAL_BYTES - MAX_MANIFEST_BYTES:,} a bundle may hold; "
                        "export fewer results per bundle")
    if sources[0].size > MAX_MEMBER_BYTES:
        raise UserError(f"the combined results.jsonl is more than the {MAX_MEMBER_BYTES:,} bytes a bundle's member may "
                        "have; export fewer results per bundle")
    manifest = {
        "format": FORMAT, "bundle_version": BUNDLE_VERSION, "schema_version": SCHEMA_VERSION,
        "hica_bench": __version__, "created": when.isoformat(), "cells": len(merged.results), "suite": suite_member,
        "prompt_files": sorted(prompt_members.values(), key=lambda p: p["path"]),
        "members": [{"path": s.name, "size": s.size, "sha256": s.sha256} for s in sources],
    }
    manifest_bytes = (json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    epoch = int(when.timestamp())

    def write(handle: BinaryIO) -> None:
        with gzip.GzipFile(filename="", mode="wb", fileobj=handle, mtime=epoch) as compressed, \
                tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for source in [_bytes_source(MANIFEST, manifest_bytes), *sources]:
                info = tarfile.TarInfo(source.name)
                info.size, info.mtime, info.mode, info.uid, info.gid = source.size, epoch, 0o644, 0, 0
                info.uname = info.gname = ""
                if source.data is not None:
                    tar.addfile(info, io.BytesIO(source.data))
                    continue
                where = f"{source.path} (for {source.name})"
                with _open_regular(source.path, where) as file:
                    reader = _HashingReader(file)
                    try:
                        tar.addfile(info, reader)
                    except OSError as exc:  # it is shorter now than when it was hashed: another process writes it
                        if "end of data" not in str(exc):
                            raise  # (writing the bundle: atomic_write names it)
                        raise UserError(f"{where}: changed while it was exported; export again") from None
                    if reader.hasher.hexdigest() != source.sha256:
                        raise UserError(f"{where}: changed while it was exported; export again")

    target = Path(target)
    atomic_write(target, write)
    return Exported(target, len(merged.results), sum(s.name.startswith("predictions/") for s in sources),
                    sorted(prompt_members), suite_member, target.stat().st_size)


# --------------------------------------------------------------------------------------------------------- reading
class _Stream:
    """A bundle's tar stream for :mod:`tarfile`: gzip-decompressed, at most :data:`MAX_STREAM_BYTES`, no single read
    above :data:`MAX_HEADER_BYTES` (a tar header claiming gigabytes is refused before it is read), and the bytes of
    the last read kept (the end-of-archive block is checked from them)."""

    def __init__(self, handle: BinaryIO, where: str) -> None:
        self._gzip = gzip.GzipFile(fileobj=handle, mode="rb")
        self._where = where
        self.last = b""

    def _room(self, end: int) -> None:
        if end > MAX_STREAM_BYTES:
            raise UserError(f"{self._where}: decompresses to more than the {MAX_STREAM_BYTES:,} bytes a bundle may "
                            "hold")

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > max(MAX_HEADER_BYTES, _CHUNK):
            raise UserError(f"{self._where}: holds a tar header of more than {MAX_HEADER_BYTES:,} bytes; not a bundle "
                            "hica-bench wrote")
        self._room(self._gzip.tell() + size)
        self.last = self._gzip.read(size)
        return self.last

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0:
            raise OSError("only absolute seeks")
        self._room(offset)
        return self._gzip.seek(offset)

    def tell(self) -> int:
        return self._gzip.tell()

    def rest_is_zeros(self) -> bool:
        """Whether every byte left in the stream is zero (the tar's padding), reading it to its end so that the gzip
        trailer's CRC and length are checked."""
        while True:
            block = self.read(_CHUNK)
            if not block:
                return True
            if block.count(0) != len(block):
                return False


_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)  # gzip.BadGzipFile is an OSError


def _kind(info: tarfile.TarInfo) -> str | None:
    """What a member is when it is not a plain regular file (None: it is one)."""
    if info.issym():
        return "a symbolic link"
    if info.islnk():
        return "a hard link"
    if info.isdir():
        return "a folder"
    if info.ischr() or info.isblk():
        return "a device"
    if info.isfifo():
        return "a FIFO"
    if info.issparse():
        return "a sparse file"
    if not info.isreg():
        return f"a special member (tar type {info.type!r})"
    return None


def _manifest(data: bytes, where: str) -> tuple[dict[str, Any], dict[str, tuple[int, str]]]:
    """The manifest, checked (a bundle of a format and schema this hica-bench reads, with well-formed entries), and the
    members it lists: name -> (size, sha256)."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeError, ValueError, RecursionError):
        raise UserError(f"{where}: its manifest.json is not JSON; not a bundle hica-bench wrote") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{where}: its manifest.json is not a hica-bench bundle's manifest")
    version, schema = manifest.get("bundle_version"), manifest.get("schema_version")
    for name, value, known in (("bundle format", version, BUNDLE_VERSION), ("results schema", schema, SCHEMA_VERSION)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{where}: its manifest's {name} version is {short(value, 40)}, not a version number")
        if value > known:
            raise UserError(f"{where}: was made by a newer hica-bench (hica-bench {short(manifest.get('hica_bench'), 40)}, "
                            f"{name} {value}; this hica-bench {__version__} reads up to {known}); upgrade hica-bench to "
                            "import it")
    members = manifest.get("members")
    if not isinstance(members, list) or len(members) + 1 > MAX_MEMBERS:
        raise UserError(f"{where}: its manifest's members must be a list of at most {MAX_MEMBERS - 1:,} entries")
    listed: dict[str, tuple[int, str]] = {}
    for entry in members:
        if not (isinstance(entry, dict) and set(entry) == {"path", "size", "sha256"} and isinstance(entry["path"], str)
                and isinstance(entry["size"], int) and not isinstance(entry["size"], bool) and entry["size"] >= 0
                and isinstance(entry["sha256"], str) and _SHA256.fullmatch(entry["sha256"])):
            raise UserError(f"{where}: its manifest lists a malformed member {short(entry, 120)} (each needs path, size "
                            "and sha256)")
        name = entry["path"]
        problem = name_problem(name) or ("is the manifest itself" if name == MANIFEST else None)
        if problem:
            raise UserError(f"{where}: its manifest lists a member {short(name)} that {problem}")
        if name in listed:
            raise UserError(f"{where}: its manifest lists {short(name)} twice")
        listed[name] = (entry["size"], entry["sha256"])
    if RESULTS not in listed:
        raise UserError(f"{where}: its manifest lists no results.jsonl")
    suite = manifest.get("suite")
    suites = {name for name in listed if name.startswith("suite/")}
    if not (suite is None or isinstance(suite, str)) or ({suite} - {None}) != suites:
        raise UserError(f"{where}: its manifest's suite ({short(suite)}) is not its one suite/ member")
    prompts = manifest.get("prompt_files")
    if not isinstance(prompts, list) or not all(
            isinstance(p, dict) and isinstance(p.get("path"), str) and isinstance(p.get("given_as"), str)
            for p in prompts) or sorted(p["path"] for p in prompts) != sorted(
            name for name in listed if name.startswith("prompts/")) or len(prompts) != len({p["path"] for p in prompts}):
        raise UserError(f"{where}: its manifest's prompt_files are not its prompts/ members, each once")
    cells = manifest.get("cells")
    if isinstance(cells, bool) or not isinstance(cells, int) or cells < 1:
        raise UserError(f"{where}: its manifest's cells is {short(cells, 40)}, not a number of cells")
    return manifest, listed


@dataclass
class Bundle:
    """A bundle read and checked by :func:`opened`: nothing of it is written yet."""

    path: Path
    manifest: dict[str, Any]
    members: dict[str, tuple[int, str]]  #: every member but the manifest: name -> (size, sha256)
    results: list[CellResult]  #: its records (one per cell)
    results_file: Path  #: its results.jsonl, in a private temporary folder (removed when :func:`opened` ends)
    small: dict[str, bytes]  #: its suite and prompt files, by member
    handle: BinaryIO = field(repr=False)  #: the bundle file, open (read a second time to copy the predictions)

    @property
    def where(self) -> str:
        return f"bundle {self.path}"

    @property
    def suite(self) -> str | None:
        return self.manifest.get("suite")

    @property
    def prompt_files(self) -> list[str]:
        return sorted(self.small.keys() - {self.suite})


def _check_layout(name: str, info: tarfile.TarInfo, where: str) -> None:
    problem = name_problem(name)
    if problem:
        raise UserError(f"{where}: holds a member {short(name)} that {problem}")
    kind = _kind(info)
    if kind:
        raise UserError(f"{where}: its member {short(name)} is {kind}; a bundle holds regular files only")


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, sink) -> str:
    """The sha256 of a member's bytes, each block also handed to ``sink`` (or None); a short member is an error."""
    hasher, size = hashlib.sha256(), 0
    source = tar.extractfile(info)
    while True:
        block = source.read(min(_CHUNK, info.size - size)) if size < info.size else b""
        if not block:
            break
        size += len(block)
        hasher.update(block)
        if sink is not None:
            sink(block)
    if size != info.size:
        raise tarfile.ReadError("unexpected end of data")
    return hasher.hexdigest()


class _Sink:
    """A file written from a bundle's member: an OSError of its own (a full disk) is a one-line UserError naming
    ``shown`` (default: the file), never taken for a damaged bundle."""

    def __init__(self, path: Path, shown: Path | None = None) -> None:
        self._path, self._shown = path, shown or path

    def __enter__(self) -> "_Sink":
        try:
            self._handle = open(self._path, "wb")
        except OSError as exc:
            raise cannot_write(self._shown, exc) from None
        return self

    def write(self, block: bytes) -> None:
        try:
            self._handle.write(block)
        except OSError as exc:
            raise cannot_write(self._shown, exc) from None

    def __exit__(self, *exc_info) -> None:
        try:
            self._handle.close()
        except OSError as exc:
            if exc_info[0] is None:
                raise cannot_write(self._shown, exc) from None


def _verify(handle: BinaryIO, path: Path, scratch: Path) -> Bundle:
    where = f"bundle {path}"
    results_file = scratch / RESULTS
    small: dict[str, bytes] = {}
    seen: set[str] = set()
    total = 0
    manifest: dict[str, Any] | None = None
    members: dict[str, tuple[int, str]] = {}
    try:
        stream = _Stream(handle, where)
        with tarfile.open(fileobj=stream, mode="r:") as tar:
            headers = 0
            for count, info in enumerate(tar, 1):
                tar.members.clear()  # tarfile keeps every header it read: not the bundle's to fill memory with
                headers += sum(len(k) + len(v) for k, v in info.pax_headers.items())
                if headers > MAX_HEADERS_BYTES:
                    raise UserError(f"{where}: its tar headers hold more than {MAX_HEADERS_BYTES:,} bytes of extended "
                                    "records; not a bundle hica-bench wrote")
                name = info.name
                if count > MAX_MEMBERS:
                    raise UserError(f"{where}: holds more than the {MAX_MEMBERS:,} members a bundle may hold")
                _check_layout(name, info, where)
                if name in seen:
                    raise UserError(f"{where}: holds {short(name)} twice")
                seen.add(name)
                if manifest is None:
                    if name != MANIFEST:
                        raise UserError(f"{where}: its first member is {short(name)}, not manifest.json; not a bundle "
                                        "hica-bench wrote")
                    if info.size > MAX_MANIFEST_BYTES:
                        raise UserError(f"{where}: its manifest.json is more than {MAX_MANIFEST_BYTES:,} bytes")
                    chunks: list[bytes] = []
                    _read_member(tar, info, chunks.append)
                    manifest, members = _manifest(b"".join(chunks), where)
                    total += info.size
                    continue
                listed = members.get(name)
                if listed is None:
                    raise UserError(f"{where}: holds {short(name)}, which its manifest does not list")
                limit = MAX_SMALL_BYTES if name.startswith(("suite/", "prompts/")) else MAX_MEMBER_BYTES
                if info.size > limit:
                    raise UserError(f"{where}: its member {short(name)} is {info.size:,} bytes, more than the "
                                    f"{limit:,} such a member may have")
                total += info.size
                if total > MAX_TOTAL_BYTES:
                    raise UserError(f"{where}: its members are more than the {MAX_TOTAL_BYTES:,} bytes a bundle may hold")
                if info.size != listed[0]:
                    raise UserError(f"{where}: its member {short(name)} is {info.size:,} bytes but its manifest says "
                                    f"{listed[0]:,}; a tampered or damaged bundle")
                if name == RESULTS:
                    with _Sink(results_file) as sink:
                        sha = _read_member(tar, info, sink.write)
                elif name.startswith(("suite/", "prompts/")):
                    chunks = []
                    sha = _read_member(tar, info, chunks.append)
                    small[name] = b"".join(chunks)
                else:
                    sha = _read_member(tar, info, None)
                if sha != listed[1]:
                    raise UserError(f"{where}: its member {short(name)} does not match its sha256 in the manifest; a "
                                    "tampered or damaged bundle")
            if manifest is None:
                raise UserError(f"{where}: holds no members; not a bundle hica-bench wrote")
            if stream.last.count(0) != 512 or not stream.rest_is_zeros():
                raise UserError(f"{where}: does not end where its tar archive ends (a damaged header, or data after "
                                "the archive)")
    except UserError:
        raise
    except _READ_ERRORS as exc:
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(f"{where}: is not a whole gzip-compressed tar ({text}); a truncated or damaged bundle, or no "
                        "bundle at all") from None
    missing = sorted(members.keys() - seen)
    if missing:
        raise UserError(f"{where}: lacks {short(missing[0])}, which its manifest lists ({len(missing)} missing); a "
                        "truncated or damaged bundle")
    for name, data in small.items():
        if name.startswith("prompts/") and name.split("/")[1] != hashlib.sha256(data).hexdigest()[:12]:
            raise UserError(f"{where}: its prompt file {short(name)} is not under its own digest's folder")
    try:
        loaded = ResultsStore(results_file).load()
    except UserError as exc:
        raise UserError(str(exc).replace(str(results_file), f"{where}'s results.jsonl")) from None
    records = list(loaded.values())
    if len(records) != manifest["cells"]:
        raise UserError(f"{where}: its results.jsonl holds {len(records)} cells but its manifest says "
                        f"{manifest['cells']}")
    named = set()
    for result in records:
        if result.predictions is not None:
            if not result.predictions.startswith("predictions/") or result.predictions not in members:
                raise UserError(f"{where}: the record of {short(_label(result), 160)} names saved predictions "
                                f"{short(result.predictions)}, which the bundle does not hold")
            if not re.fullmatch(rf"predictions/{re.escape(result.cell_id)}(\.[A-Za-z0-9]{{1,8}})?", result.predictions):
                # export names each file after its cell: a record naming another cell's file would overwrite that
                # cell's predictions in --out
                raise UserError(f"{where}: the record of {short(_label(result), 160)} names saved predictions "
                                f"{short(result.predictions)}, not its own cell's (predictions/{result.cell_id}.npz)")
            named.add(result.predictions)
    unused = sorted(n for n in members if n.startswith("predictions/") and n not in named)
    if unused:
        raise UserError(f"{where}: holds {short(unused[0])}, which no record names ({len(unused)} such files)")
    return Bundle(path, manifest, members, records, results_file, small, handle)


@contextlib.contextmanager
def opened(path: Path) -> Iterator[Bundle]:
    """The bundle at ``path``, read to its end and checked (module docstring); any problem is a one-line
    :class:`UserError` and nothing is written anywhere but a private temporary folder (its results.jsonl, removed when
    the block ends)."""
    path = Path(path)
    handle = _open_regular(path, f"bundle {path}")
    try:
        scratch = Path(tempfile.mkdtemp(prefix="hica-bench-import-"))
    except OSError as exc:
        handle.close()
        raise UserError(f"cannot make a temporary folder to check bundle {path} in ({exc.strerror or exc})") from None
    try:
        try:
            checked = _verify(handle, path, scratch)
        except UserError as exc:
            raise UserError(f"{exc}; refused, nothing written") from None
        yield checked
    finally:
        handle.close()
        shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------- import
@dataclass
class Imported:
    """What :func:`import_into` did."""

    merged: Merged  #: the merge, as ``hica-bench merge`` reports it
    cells: int  #: the bundle's cells
    predictions: int  #: saved predictions files written
    prompt_files: list[Path]  #: where its prompt files are in the folder
    suite: Path | None  #: where its suite is in the folder
    unchanged: int = 0  #: files of the bundle already in the folder with the same bytes (not written again)


def _inside(out: Path, name: str, where: str) -> Path:
    """``out / name``, checked to stay in ``out`` once links already in ``out`` are followed."""
    target = out / name
    root = out.resolve()
    if not target.parent.resolve().is_relative_to(root):
        raise UserError(f"{where}: {target.parent} leads outside {out} (a link); import into another --out (nothing "
                        "written)")
    if target.is_dir() and not target.is_symlink():
        raise UserError(f"{where}: {target} is a folder; import into another --out (nothing written)")
    return target


def _same_bytes(path: Path, sha256: str) -> bool:
    """Whether ``path`` is a regular file (not a link) holding bytes of this digest."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        hasher = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(_CHUNK), b""):
                hasher.update(block)
        return hasher.hexdigest() == sha256
    except OSError:
        return False


def import_into(bundle: Bundle, out: Path) -> Imported:
    """Merge ``bundle`` into the folder ``out`` (which the caller has made and locked): its records with ``out``'s
    ``results.jsonl`` (if any) by the rules of ``hica-bench merge`` (:func:`hica_bench.results.merge_shards`), the
    saved predictions of the records it adds under ``out/predictions/``, its prompt files under ``out/prompts/`` and its
    suite under ``out/suite/``. Everything is planned first (a conflict with ``out``'s results or files is one line,
    nothing written); then the files are written, each atomically, the predictions all or none, results.jsonl last."""
    out = Path(out)
    where = bundle.where
    target = out / RESULTS
    try:
        merged = merge_shards(([target] if target.exists() else []) + [bundle.results_file], out)
    except UserError as exc:
        raise UserError(str(exc).replace(str(bundle.results_file), f"{where}")) from None
    ours = {r.cell_id: r.predictions for r in bundle.results}
    for result in merged.appended:  # merge_shards pointed them at the temporary folder: they go under out/ instead
        result.predictions = ours.get(result.cell_id)
    wanted = sorted({r.predictions for r in merged.appended if r.predictions})
    plan: list[tuple[str, Path]] = []
    unchanged = 0
    for name in [*sorted(bundle.small), *wanted]:
        path = _inside(out, name, where)
        if _same_bytes(path, bundle.members[name][1]):
            unchanged += 1
            continue
        # a saved predictions file of another record is replaced, as a rerun of its cell replaces it
        if (path.exists() or path.is_symlink()) and not name.startswith("predictions/"):
            raise UserError(f"{where}: {path} exists with other content; remove it or import into another --out "
                            "(nothing written)")
        plan.append((name, path))
    extract = {name: path for name, path in plan if name not in bundle.small}
    _extract(bundle, extract)
    for name, path in plan:
        if name in bundle.small:
            atomic_write(path, bundle.small[name])
    atomic_write(target, merged.text)
    return Imported(merged, len(bundle.results), len(extract), [out / name for name in bundle.prompt_files],
                    None if bundle.suite is None else out / bundle.suite, unchanged)


def _extract(bundle: Bundle, wanted: dict[str, Path]) -> None:
    """Copy the members ``wanted`` (name -> file) out of the bundle, each checked against its digest again (the file
    may have changed since it was checked): all of them are renamed into place, or none."""
    if not wanted:
        return
    where = bundle.where
    changed = f"{where}: changed while it was imported; nothing of it was written"
    found: set[str] = set()
    with contextlib.ExitStack() as stack:
        try:
            bundle.handle.seek(0)
            with tarfile.open(fileobj=_Stream(bundle.handle, where), mode="r:") as tar:
                for info in tar:
                    if info.name not in wanted or info.name in found:
                        continue
                    if _kind(info) or info.size != bundle.members[info.name][0]:
                        raise UserError(changed)
                    tmp = stack.enter_context(atomic_path(wanted[info.name]))
                    with _Sink(tmp, wanted[info.name]) as sink:
                        sha = _read_member(tar, info, sink.write)
                    if sha != bundle.members[info.name][1]:
                        raise UserError(changed)
                    found.add(info.name)
                    if len(found) == len(wanted):
                        break
        except UserError:
            raise
        except _READ_ERRORS:
            raise UserError(changed) from None
        if len(found) != len(wanted):
            raise UserError(changed)
