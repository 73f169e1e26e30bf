"""The machine and package facts recorded in each result (:class:`~hica_bench.results.Environment`): what decides
whether two runs are comparable, and the names of the CPU and GPU a run used."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from hica_bench.results import Environment


def git_commit() -> tuple[str | None, str | None]:
    """HEAD's commit hash and its committer time (ISO 8601, e.g. ``2026-11-29T19:49:22+01:00``) in the checkout this
    package is imported from, in one ``git`` call; (None, None) outside a git checkout or without git."""
    try:
        out = subprocess.run(
            # a marked format (a user's log.showSignature adds gpg lines to the output; they are not ours)
            ["git", "-c", "log.showSignature=false", "show", "-s", "--format=hica-bench-commit %H %cI", "HEAD"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None, None
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "hica-bench-commit" and re.fullmatch(r"[0-9a-f]{40,64}", parts[1]):
            return parts[1], parts[2]
    return None, None


def git_hash() -> str | None:
    """HEAD's commit hash (:func:`git_commit`), or None."""
    return git_commit()[0]


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


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device, else the CPU's model."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def environment(device: str, extraction: dict[str, Any] | None = None) -> Environment:
    """Versions and machine facts that decide whether two runs are comparable (``torch_threads`` is None when the run
    did not load torch: every feature came from the cache)."""
    torch = sys.modules.get("torch")
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
    git, git_time = git_commit()
    return Environment(
        packages=dict(sorted(packages.items())),
        python=platform.python_version(),
        platform=platform.platform(),
        device=device,
        device_name=device_name(device) if device.startswith("cuda") else cpu,
        cpu_count=os.cpu_count(),
        cpu_model=cpu,
        torch_threads=torch.get_num_threads() if hasattr(torch, "get_num_threads") else None,
        git=git,
        git_time=git_time,
        extraction=extraction,
    )
