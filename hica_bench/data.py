"""Data roots, lazy (memory-mapped) arrays from ``.npz`` files, and preprocessing to an encoder's input.

Dataset plugins use :class:`LazyNpz` so that a large split (e.g. a 224 px MedMNIST set) is never
copied whole into RAM: a compressed member is streamed once into an uncompressed ``.npy`` beside the
feature cache and memory-mapped from there; a stored (uncompressed) member is memory-mapped in place.
"""

from __future__ import annotations

import mmap
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from hica_bench.errors import UserError
from hica_bench.files import atomic_path, digest
from hica_bench.interfaces import InputSpec

DATA_ENV = "HICA_BENCH_DATA"
CACHE_ENV = "HICA_BENCH_CACHE"


def data_root(cli_value: str | None) -> str | None:
    """``--data-root`` > ``$HICA_BENCH_DATA`` > None (the dataset plugin's own default)."""
    value = cli_value or os.environ.get(DATA_ENV) or None
    if value is not None and not Path(value).expanduser().is_dir():
        source = "--data-root" if cli_value else f"${DATA_ENV}"
        raise UserError(f"data root {value!r} (from {source}) does not exist or is not a directory")
    return str(Path(value).expanduser()) if value else None


def cache_root(cli_value: str | None) -> Path:
    """``--cache-dir`` > ``$HICA_BENCH_CACHE`` > ``~/.cache/hica-bench``."""
    value = cli_value or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hica-bench"
    return writable_dir(Path(value).expanduser(), "cache directory")


def check_size(size: int) -> int:
    """``--size``: the image side of the dataset files, a positive number of pixels (each dataset plugin says which
    sizes it has)."""
    if size < 1:
        raise UserError(f"--size must be positive, got {size}")
    return size


def writable_dir(path: Path, what: str) -> Path:
    """``path`` as a folder this process can write to (created if missing), else a UserError naming ``what``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{what} {str(path)!r} is not writable ({exc.strerror or exc})") from None
    return path


def file_fingerprint(path: Path) -> str:
    """Cheap identity of a file's version on this machine: name, byte size and modification time (names scratch
    copies; a dataset's identity uses :func:`hica_bench.files.file_sha256`, which is the same on every machine)."""
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"


class LazyNpz:
    """Read-only access to the arrays of one ``.npz`` file without loading images into memory."""

    def __init__(self, path: Path, scratch_dir: Path) -> None:
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
            self.keys = {name[:-4] for name in self._zip.namelist() if name.endswith(".npy")}
        except (zipfile.BadZipFile, OSError) as exc:
            raise UserError(f"{self.path} is not a readable .npz file ({exc}); delete it and download it again") from None
        self._scratch = Path(scratch_dir) / "arrays" / f"{self.path.stem}-{digest(file_fingerprint(self.path), 16)}"

    def require(self, keys: list[str]) -> None:
        missing = [k for k in keys if k not in self.keys]
        if missing:
            raise UserError(f"{self.path} lacks the arrays {', '.join(missing)} (it has: {', '.join(sorted(self.keys))})")

    def load(self, key: str) -> np.ndarray:
        """The whole array in memory (for small arrays such as labels)."""
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                return npz[key]
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise UserError(f"{self.path}: array {key!r} is unreadable ({exc}); delete the file and download it again") from None

    def memmap(self, key: str) -> np.ndarray:
        """The array as a read-only memory map."""
        info = self._zip.getinfo(f"{key}.npy")
        if info.compress_type == zipfile.ZIP_STORED:  # memory-map in place, right after the member's header
            with self.path.open("rb") as handle:
                handle.seek(info.header_offset + 26)
                name_len, extra_len = np.frombuffer(handle.read(4), dtype="<u2")
                handle.seek(info.header_offset + 30 + int(name_len) + int(extra_len))
                version = np.lib.format.read_magic(handle)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                if version in read_header:
                    shape, fortran, dtype = read_header[version](handle)
                    offset = handle.tell()
                    return np.memmap(self.path, dtype=dtype, mode="r", shape=shape, offset=offset, order="F" if fortran else "C")
        target = self._scratch / f"{key}.npy"
        if not target.exists():
            try:
                with atomic_path(target) as partial, self._zip.open(info) as source, partial.open("wb") as sink:
                    shutil.copyfileobj(source, sink, length=1 << 22)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise UserError(f"{self.path}: array {key!r} is truncated or corrupt ({exc}); download it again") from None
        try:
            return np.load(target, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            target.unlink(missing_ok=True)
            raise UserError(f"{self.path}: array {key!r} is not a valid array ({exc})") from None


def release_pages(images: np.ndarray | None) -> None:
    """Unmap from this process every page of the read-only memory map behind ``images`` (a ``np.memmap`` opened
    with mode ``"r"``, or a view of one); anything else (a plain array, None, a writable or copy-on-write map,
    a platform without ``MADV_DONTNEED``) is left alone.

    Pages of a file-backed map stay resident, and count in the process's RSS, once read: without this, reading a
    1 GB split through its map grows RSS by 1 GB. The data is untouched: the next access re-reads the pages, from
    the page cache if the kernel still holds them. Call it after copying what is needed out of the map."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    node = images
    while isinstance(node, np.ndarray):
        if isinstance(node, np.memmap) and node._mmap is not None:
            if advice is not None and node.mode == "r" and hasattr(node._mmap, "madvise"):
                try:
                    node._mmap.madvise(advice)
                except (OSError, ValueError):  # a closed map, or a kernel that refuses the advice: nothing to release
                    pass
            return
        node = node.base


def preprocessing_id(spec: InputSpec) -> str:
    """Everything about preprocessing that changes features; part of every feature-cache key."""
    return f"uint8/255|rgb|resize{spec.size}-{spec.interpolation}-antialias|mean{spec.mean}|std{spec.std}"


def preprocess(images: np.ndarray, spec: InputSpec, device: str = "cpu"):
    """uint8 (N, H, W) or (N, H, W, 3) -> float32 tensor (N, 3, size, size) normalised per ``spec``."""
    import torch
    import torch.nn.functional as F

    batch = torch.from_numpy(np.array(images, copy=True))  # a small writable copy of a (read-only) memmap slice
    if device != "cpu":
        batch = batch.pin_memory().to(device, non_blocking=True)
    batch = batch.float()
    batch = batch.unsqueeze(1) if batch.ndim == 3 else batch.permute(0, 3, 1, 2)
    if batch.shape[-1] != spec.size or batch.shape[-2] != spec.size:
        batch = F.interpolate(batch, size=(spec.size, spec.size), mode=spec.interpolation, antialias=True, align_corners=False)
        batch = batch.clamp_(0.0, 255.0)
    mean = torch.tensor(spec.mean, device=batch.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.std, device=batch.device).view(1, 3, 1, 1) * 255.0
    # a grey batch (N, 1, S, S) broadcasts to three channels here, after the (cheaper) one-channel resize
    return ((batch - mean) / std).contiguous()
