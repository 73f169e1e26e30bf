"""The versioned result schema and the JSONL results store (append-only, resumable).

One JSON object per line, one line per finished cell. A line is written with a single ``write`` on a
file opened for appending and then fsync'ed, so a killed run leaves at most one truncated last line:
:meth:`ResultsStore.load` skips it and the next append cuts it off before writing (it was never a
finished cell), so the file again holds only whole records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from hica_bench.errors import UserError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUSES = ("ok", "failed", "not_applicable")


@dataclass(frozen=True)
class CellKey:
    """What identifies a cell; a rerun skips a cell whose key already has an ``ok`` or ``not_applicable`` result."""

    dataset: str
    size: int
    method: str  #: method label incl. non-default options, e.g. ``linear-probe`` or ``hica:lambda1=0.5``
    encoder: str  #: encoder label incl. non-default options
    k: int
    seed: int
    max_test: int | None = None

    @property
    def id(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class CellResult:
    key: CellKey
    status: str
    metrics: dict[str, float] | None = None
    reason: str | None = None  #: the error (failed) or why the method does not apply (not_applicable)
    support_hash: str | None = None
    n_support: int | None = None
    n_test: int | None = None
    timings: dict[str, float] = field(default_factory=dict)  #: fit_s, predict_s, encoder throughput
    options: dict[str, Any] = field(default_factory=dict)  #: full method and encoder options
    environment: dict[str, Any] = field(default_factory=dict)
    finished_at: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        record = dataclasses.asdict(self)
        record["cell_id"] = self.key.id
        return json.dumps(record, sort_keys=True, allow_nan=True)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "CellResult":
        record = dict(record)
        record.pop("cell_id", None)
        record["key"] = CellKey(**record["key"])
        return cls(**record)


class ResultsStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, CellResult]:
        """The newest result per cell id. Truncated lines (from a killed write) are skipped, and so is a
        last line without its newline even when it parses: the next :meth:`append` cuts it off."""
        results: dict[str, CellResult] = {}
        if not self.path.exists():
            return results
        lines = self.path.read_text().split("\n")
        if lines.pop().strip():  # the text after the last newline ("" when the file ends with one)
            log.warning("%s:%d is truncated; ignoring it", self.path, len(lines) + 1)
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d is truncated; ignoring it", self.path, number)
                continue
            version = record.get("schema_version") if isinstance(record, dict) else None
            if not isinstance(version, int):
                raise UserError(f"{self.path}:{number} is not a hica-bench result record")
            if version > SCHEMA_VERSION:
                raise UserError(
                    f"{self.path} was written by a newer hica-bench (schema {version} > {SCHEMA_VERSION}); "
                    "upgrade hica-bench or use another --out"
                )
            try:
                result = CellResult.from_record(record)
            except TypeError as exc:
                raise UserError(f"{self.path}:{number} does not match result schema {version} ({exc})") from None
            results[result.key.id] = result
        return results

    def append(self, result: CellResult) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        result.finished_at = result.finished_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
        line = result.to_json() + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            whole = _whole_lines_size(self.path, size)
            if whole != size:  # a killed write left a partial last line (never a finished cell): cut it off
                os.ftruncate(fd, whole)
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)


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


def _git_hash() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's model name: ``/proc/cpuinfo`` (Linux), else py-cpuinfo when installed, else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    try:
        import cpuinfo  # optional (py-cpuinfo); slow, so only where /proc/cpuinfo is missing

        return str(cpuinfo.get_cpu_info().get("brand_raw") or "")
    except Exception:
        return platform.processor() or platform.machine()


def environment(device: str) -> dict[str, Any]:
    """Versions and machine facts that decide whether two runs are comparable."""
    import torch

    packages = {}
    for name in ("hica-bench", "torch", "torchvision", "numpy", "scikit-learn", "timm", "open_clip_torch", "transformers", "medmnist"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    for dist in metadata.distributions():
        if dist.entry_points.select(group="hica_bench"):
            packages[dist.metadata["Name"]] = dist.version
    cpu = cpu_model()
    device_name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else cpu
    return {
        "packages": dict(sorted(packages.items())),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "torch_threads": torch.get_num_threads(),
        "git": _git_hash(),
    }
