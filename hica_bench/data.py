"""Data roots, lazy (memory-mapped) arrays from ``.npz`` files, and preprocessing to an encoder's input.

Dataset plugins use :class:`LazyNpz` so that a large split (e.g. a 224 px MedMNIST set) is never
copied whole into RAM: a compressed member is streamed once into an uncompressed ``.npy`` beside the
feature cache and memory-mapped from there; a stored (uncompressed) member is memory-mapped in place.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import mmap
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from hica_bench.errors import UserError, first_line
from hica_bench.files import atomic_path, atomic_write, cannot_write, digest
from hica_bench.interfaces import InputSpec

log = logging.getLogger(__name__)

DATA_ENV = "HICA_BENCH_DATA"
CACHE_ENV = "HICA_BENCH_CACHE"


_PROGRESS: list[Callable[[str, int], Callable[[int], None]] | None] = []  #: where :func:`progress` reports


@contextlib.contextmanager
def progress_to(report: Callable[[str, int], Callable[[int], None]] | None) -> Iterator[None]:
    """Inside, :func:`progress` reports to ``report(text, total) -> advance`` (a run's display); None: nowhere."""
    _PROGRESS.append(report)
    try:
        yield
    finally:
        _PROGRESS.pop()


def progress(text: str, total: int) -> Callable[[int], None]:
    """For dataset plugins doing long work while they are built (decoding a folder of images): a counter the run shows
    as it shows its own steps (a bar on a terminal, a line a minute in a log); call the returned function with each
    step's count. Outside a run it does nothing."""
    report = _PROGRESS[-1] if _PROGRESS else None
    return report(text, total) if report is not None else (lambda count: None)


def split_identity(dataset: Any, split: str) -> str:
    """The content identity of ``dataset``'s ``split`` (the feature-cache key's dataset part): the dataset's optional
    ``split_identity(split)`` (see :class:`~hica_bench.interfaces.FewShotDataset`; a dataset whose splits differ in
    content from its whole, such as one with a corrupted test split, says so), else its ``identity``."""
    own = getattr(dataset, "split_identity", None)
    return own(split) if callable(own) else dataset.identity


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


MAX_SIZE = 2048  #: the largest image side a dataset may be read at (--size): 2048² × 3 bytes an image


def check_size(size: int) -> int:
    """``--size``: the image side of the dataset files, a positive number of pixels (each dataset plugin says which
    sizes it has)."""
    if not 1 <= size <= MAX_SIZE:
        raise UserError(f"--size must be 1 to {MAX_SIZE} pixels, got {size}")
    return size


def writable_file(path: Path, what: str) -> Path:
    """``path`` as a file this process can (re)write: not a folder, in a writable folder; checked before the work
    whose result goes there, else a UserError naming ``what``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{what} {str(path)!r} is not writable")
    writable_dir(path.parent, f"{what}'s folder")
    return path


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
                array = npz[key]
        except Exception as exc:  # any reader of any member (zlib, bz2, lzma, a header promising terabytes...)
            raise UserError(f"{self.path}: array {key!r} is unreadable ({type(exc).__name__}: {first_line(exc)}); "
                            "delete the file and download it again") from None
        if not isinstance(array, np.ndarray):  # numpy hands back the raw bytes of a member that is not a .npy array
            raise UserError(f"{self.path}: array {key!r} is not a valid .npy array; download the file again")
        return array

    def memmap(self, key: str) -> np.ndarray:
        """The array as a read-only memory map: in place for a stored (uncompressed) member, else from a scratch copy
        under the cache folder. A member whose ``.npy`` header does not fit its bytes is the dataset file's fault (one
        line naming it); a scratch copy that no longer matches its member's CRC-32 (damaged, edited) is the cache's,
        and is made again."""
        info = self._zip.getinfo(f"{key}.npy")
        if info.compress_type == zipfile.ZIP_STORED:  # memory-map in place, right after the member's header
            try:
                return self._memmap_stored(info)
            except Exception as exc:  # a header numpy cannot parse, promises the member cannot keep, objects
                raise UserError(f"{self.path}: array {key!r} is not a valid .npy array ({first_line(exc)}); "
                                "download the file again") from None
        target = self._scratch / f"{key}.npy"
        if not self._scratch_matches(target, info):
            self._copy_member(info, key, target)
        try:
            array = np.load(target, mmap_mode="r", allow_pickle=False)
        except (ValueError, OverflowError) as exc:  # the copy is the member's bytes: the member is not a valid array
            raise UserError(f"{self.path}: array {key!r} is not a valid .npy array ({first_line(exc)}); "
                            "download the file again") from None
        return array

    def _copy_member(self, info: zipfile.ZipInfo, key: str, target: Path) -> None:
        """The member's bytes into ``target`` (atomically), with a stamp of its CRC-32. A read that fails is the dataset
        file's fault; a write that fails is the cache folder's."""
        with atomic_path(target) as partial:
            try:
                sink = partial.open("wb")
            except OSError as exc:
                raise cannot_write(target, exc) from None
            with sink:
                try:
                    source = self._zip.open(info)
                except Exception as exc:  # an unsupported method, an encrypted member, a damaged local header
                    raise UserError(f"{self.path}: array {key!r} cannot be read ({type(exc).__name__}: "
                                    f"{first_line(exc)}); download it again") from None
                with source:
                    while True:
                        try:  # zipfile checks the member's CRC-32 at its end
                            block = source.read(1 << 22)
                        except Exception as exc:  # zlib, bz2, lzma errors, a bad CRC, a truncated file
                            raise UserError(f"{self.path}: array {key!r} is truncated or corrupt ({type(exc).__name__}: "
                                            f"{first_line(exc)}); download it again") from None
                        if not block:
                            break
                        try:
                            sink.write(block)
                        except OSError as exc:
                            raise cannot_write(target, exc) from None
        stat = target.stat()
        atomic_write(self._stamp(target), json.dumps({"crc32": info.CRC, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))

    def _memmap_stored(self, info: zipfile.ZipInfo) -> np.ndarray:
        with self.path.open("rb") as handle:
            handle.seek(info.header_offset + 26)
            name_len, extra_len = np.frombuffer(handle.read(4), dtype="<u2")
            start = info.header_offset + 30 + int(name_len) + int(extra_len)
            handle.seek(start)
            version = np.lib.format.read_magic(handle)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0,
                           (3, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f"unknown .npy format version {version}")
            shape, fortran, dtype = read_header[version](handle)
            offset = handle.tell()
        if np.dtype(dtype).hasobject:  # Python objects cannot be mapped from a file (and are never loaded: no pickle)
            raise ValueError(f"it holds Python objects (dtype {np.dtype(dtype)})")
        needed = math.prod(int(n) for n in shape) * np.dtype(dtype).itemsize  # Python ints: no overflow warning
        held = start + info.file_size - offset
        if needed > held:  # a map past the member would read the next member's bytes (or fail past the file)
            raise ValueError(f"its header promises shape {tuple(shape)} ({needed} bytes) but the member holds {held}")
        return np.memmap(self.path, dtype=dtype, mode="r", shape=shape, offset=offset, order="F" if fortran else "C")

    @staticmethod
    def _stamp(target: Path) -> Path:
        return target.with_name(target.name + ".json")

    def _scratch_matches(self, target: Path, info: zipfile.ZipInfo) -> bool:
        """Whether the scratch copy is still the member's bytes: same size and modification time as when it was written
        (cheap), else its CRC-32 is checked against the member's; a copy that fails is removed (with a warning)."""
        if not target.exists():
            return False
        try:
            stamp = json.loads(self._stamp(target).read_text())
            stat = target.stat()
            if stamp["crc32"] == info.CRC and (stamp["size"], stamp["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
                return True
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            pass
        crc = 0
        try:
            with target.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    crc = zlib.crc32(block, crc)
        except OSError:
            crc = None
        if crc == info.CRC:
            stat = target.stat()
            atomic_write(self._stamp(target), json.dumps({"crc32": info.CRC, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))
            return True
        log.warning("scratch copy %s does not match %s (damaged or edited); making it again", target, self.path.name)
        target.unlink(missing_ok=True)
        return False


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


def normalisation(spec: InputSpec) -> tuple[list[float], list[float]]:
    """The per-channel constants of ``(x - mean) / std`` on pixels 0-255: the float32 products ``mean * 255`` and
    ``std * 255`` (as a broadcast (1, 3, 1, 1) float32 tensor held them), as Python floats; :func:`preprocess` and the
    graphs with which ONNX Runtime prepares the images itself (:mod:`hica_bench.extraction.backends`) both use these."""
    import torch

    return (torch.tensor(spec.mean) * 255.0).tolist(), (torch.tensor(spec.std) * 255.0).tolist()


def preprocess(images: np.ndarray, spec: InputSpec, device: str = "cpu", buffers: dict[str, Any] | None = None):
    """uint8 (N, H, W) or (N, H, W, 3) -> float32 tensor (N, 3, size, size) normalised per ``spec``.

    ``buffers``: a dict the caller keeps between calls (one per batch in flight): the resized batch (and the first of
    its two products, :func:`_resize`) and the result are written into tensors kept there, so a loop over batches does
    not allocate (and page-fault in) ~10 MB per batch; the result then lives in that dict's tensor until its next call.
    The features are the same bits either way."""
    import torch

    batch = torch.from_numpy(np.array(images, copy=True))  # a small writable copy of a (read-only) memmap slice
    if device != "cpu":
        batch = batch.pin_memory().to(device, non_blocking=True)
    batch = batch.float()
    batch = batch.unsqueeze(1) if batch.ndim == 3 else batch.permute(0, 3, 1, 2)
    size = (spec.size, spec.size)
    if batch.shape[-2:] != size:
        batch = _resize(batch, size, spec.interpolation, buffers).clamp_(0.0, 255.0)
    # (x - mean) / std per channel, each written once into the (N, 3, S, S) result: the same float32 operations (the
    # constants are normalisation()'s), so the same bits as normalising the broadcast batch (tests/unit/test_data.py),
    # at a quarter of the time and memory traffic on CPU (measured: 0.69 → 0.17 ms per 224-px image on 2 cores); a
    # grey batch (N, 1, S, S) is resized once, and a channel whose constants equal an earlier one's is a copy of it
    mean, std = normalisation(spec)
    # the divisors as 0-dim tensors on the batch's device: CUDA divides by a CPU scalar as a product with its
    # reciprocal (a bit off), by a device tensor truly, as the broadcast (1, 3, 1, 1) tensor was divided. Kept with the
    # buffers: on CUDA making them is a blocking copy, which would wait for the forward running on the stream
    key = f"divisors {std} on {batch.device}"
    divisors = None if buffers is None else buffers.get(key)
    if divisors is None:
        divisors = torch.tensor(std, device=batch.device)
        if buffers is not None:
            buffers[key] = divisors
    shape = (batch.shape[0], 3, *batch.shape[2:])
    out = (torch.empty(shape, dtype=torch.float32, device=batch.device) if buffers is None
           else _kept(buffers, "out", shape, batch.device))
    done: dict[tuple[int, float, float], int] = {}
    for channel in range(3):
        source = 0 if batch.shape[1] == 1 else channel
        same = done.get((source, mean[channel], std[channel]))
        if same is not None:
            out[:, channel].copy_(out[:, same])
            continue
        torch.sub(batch[:, source], mean[channel], out=out[:, channel]).div_(divisors[channel])
        done[(source, mean[channel], std[channel])] = channel
    return out


#: the resize kernels F.interpolate calls for antialiased bicubic and bilinear, which take an ``out`` tensor
RESIZE_KERNELS = {"bicubic": "_upsample_bicubic2d_aa", "bilinear": "_upsample_bilinear2d_aa"}

#: the largest image side (pixels) that :func:`_resize` resizes as two matrix products on the CPU. Measured on 2 cores
#: (one thread, 8 grey images to 224 px, bicubic), the products' time against torch's kernel's: 28 px 0.19, 64 px 0.40,
#: 128 px 0.77, and 224 -> 384 px 1.28; downsampling 512 -> 224 px is slower and not the same bits
PRODUCTS_MAX_SIDE = 64
#: the most images in a batch resized so (the probe's largest batch): each new batch shape is checked once on a random
#: batch of its size (:func:`products_match`), which a call with a whole split at once would make as large as the split
PRODUCTS_MAX_BATCH = 64


def _resize(batch, size: tuple[int, int], interpolation: str, buffers: dict[str, Any] | None):
    """``F.interpolate(batch, size, mode=interpolation, antialias=True)``, bit for bit, into ``buffers`` when given.

    Small images on the CPU (sides up to :data:`PRODUCTS_MAX_SIDE`, up to :data:`PRODUCTS_MAX_BATCH` of them) are
    resized as two matrix products, their columns and then their rows, by weight matrices read off torch's kernel
    itself (:func:`resize_weights`): 5x faster than the kernel for 28 px images, whose resize was the largest part of
    preparing a batch beside the engine's forward. The two are the same arithmetic (each output a sum, in order, of
    the same products) only where the matrix library adds the products in the kernel's order, so a batch shape is
    resized this way only once the two have given the same bits on a random batch of that shape
    (:func:`products_match`); anywhere else, and on CUDA, torch's kernel runs, on the batch as given."""
    import torch
    import torch.nn.functional as F

    kernel = RESIZE_KERNELS.get(interpolation)
    if kernel is None or not hasattr(torch._C._nn, kernel):
        return F.interpolate(batch, size=size, mode=interpolation, antialias=True, align_corners=False)

    def tensor(name: str, shape: tuple[int, ...]):
        return (_kept(buffers, name, shape, batch.device) if buffers is not None
                else torch.empty(shape, dtype=torch.float32, device=batch.device))

    resized = tensor("resized", (*batch.shape[:2], *size))
    if (batch.device.type == "cpu" and max(batch.shape[-2:]) <= PRODUCTS_MAX_SIDE
            and batch.shape[0] <= PRODUCTS_MAX_BATCH):
        dense = batch.contiguous()  # an RGB batch is a permuted view: the products are checked on a contiguous one
        if products_match(kernel, tuple(dense.shape), size, torch.get_num_threads()):
            return resize_by_products(kernel, dense, size, tensor("across", (*dense.shape[:3], size[1])), resized)
    return getattr(torch._C._nn, kernel)(batch, size, False, None, None, out=resized)


def resize_by_products(kernel: str, batch, size: tuple[int, int], across, out):
    """(N, C, h, w) float32 -> ``out`` (N, C, size): ``batch @ columns`` into ``across`` (N, C, h, size[1]), then
    ``rows @ across`` (h -> size[0]). Both results are given (float32): the check runs the very calls that real use runs
    (with ``out=``, ``torch.matmul`` neither autocasts nor folds the batch another way)."""
    import torch

    torch.matmul(batch, resize_weights(kernel, batch.shape[-1], size[1], True), out=across)
    return torch.matmul(resize_weights(kernel, batch.shape[-2], size[0], False), across, out=out)


@functools.lru_cache(maxsize=64)
def resize_weights(kernel: str, n_in: int, n_out: int, transposed: bool):
    """The (n_out, n_in) matrix whose row i holds the weights torch's ``kernel`` gives output i when resizing one axis
    from n_in to n_out (contiguous; its transpose if ``transposed``): read off the kernel itself, from the n_in unit
    impulses resized along that axis (two columns wide, left as they are: torch 2.14 takes another path for a width
    of 1)."""
    import torch

    impulses = torch.eye(n_in, dtype=torch.float32).reshape(n_in, 1, n_in, 1).expand(n_in, 1, n_in, 2).contiguous()
    weights = getattr(torch._C._nn, kernel)(impulses, (n_out, 2), False, None, None)[:, 0, :, 0]  # (n_in, n_out)
    return (weights if transposed else weights.T).contiguous()


@functools.lru_cache(maxsize=256)
def products_match(kernel: str, shape: tuple[int, ...], size: tuple[int, int], threads: int) -> bool:
    """Whether :func:`resize_by_products` gives torch's ``kernel``'s bits for a batch of ``shape`` resized to ``size``
    with ``threads`` torch threads: both run on one random batch of whole numbers 0-255 (what a uint8 image becomes),
    once per process for each. Adding the same products in another order, or rounding them otherwise, differs in a
    large part of the pixels (adding the rows first: 40 % of them), so one random batch all but surely shows it."""
    import torch

    sample = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0)).float()
    expected = getattr(torch._C._nn, kernel)(sample, size, False, None, None)
    across = torch.empty((*shape[:3], size[1]), dtype=torch.float32)
    got = resize_by_products(kernel, sample, size, across, torch.empty_like(expected))
    return torch.equal(got.view(torch.int32), expected.view(torch.int32))  # bits: -0.0 is not 0.0 here


def _kept(buffers: dict[str, Any], name: str, shape: tuple[int, ...], device: Any):
    """A float32 tensor of ``shape`` kept in ``buffers[name]``: the first ``shape[0]`` rows of the one kept there when
    it is large enough (a batch's last, shorter slice), else a new one, kept."""
    import torch

    kept = buffers.get(name)
    if kept is None or kept.shape[1:] != shape[1:] or kept.shape[0] < shape[0] or kept.device != torch.device(device):
        kept = buffers[name] = torch.empty(shape, dtype=torch.float32, device=device)
    return kept[: shape[0]]
