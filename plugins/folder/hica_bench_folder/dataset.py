"""A folder dataset, decoded once into a uint8 memory map under the cache folder.

The dataset's identity is a digest of every file's path below the root, class, split and content (sha256, read once
per file version and remembered under the cache folder), with the size, the resize mode and the decoder's version:
any changed, added or removed file, another split or another decoder makes another dataset, so the feature cache and
resume stay honest. The decoded images live in ``CACHE/datasets/<name>-<size>px-<digest>/`` (``images.npy``,
``labels.npy``, ``dataset.json`` with the classes, the split ranges and the skipped files, ``split.csv`` recording
which file went to which split); a second run with the same files decodes nothing. Decoding runs in threads (Pillow,
pydicom and numpy release the GIL while they work) and is shown as a counted step of the run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from hica_bench import data
from hica_bench.errors import UserError
from hica_bench.files import atomic_dir, digest, file_sha256
from hica_bench.interfaces import Option, PluginSpec, Split
from hica_bench_folder import decode, layout

DECODER_VERSION = 1  #: bump when decoding changes any pixel: every folder dataset's identity changes with it
log = logging.getLogger(__name__)


@contextlib.contextmanager
def _decoders_quiet():
    """While images decode: pydicom's log records and warnings go to the debug log instead of stderr (a run's stderr
    holds hica-bench's own lines); yields a dict, filled when the block ends, of the files each of hica-bench's own
    decoding warnings (:class:`decode.FlatWindow`, :class:`decode.StrayBytes`) was raised for."""
    pydicom_log = logging.getLogger("pydicom")
    propagate = pydicom_log.propagate
    noted: dict[type, list[str]] = {decode.FlatWindow: [], decode.StrayBytes: []}
    pydicom_log.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield noted
        for warning in caught:
            if warning.category in noted:
                noted[warning.category].append(warning.message.path)
            else:
                log.debug("decoding: %s: %s", warning.category.__name__, warning.message)
    finally:
        pydicom_log.propagate = propagate


def workers() -> int:
    try:
        return max(1, min(16, len(os.sched_getaffinity(0))))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, min(16, os.cpu_count() or 1))


def _new_array(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A new uint8 ``.npy`` file of ``shape`` mapped for writing, its blocks allocated now: a full disk is one line
    here, not a crash (SIGBUS) when a page of a sparse map cannot be written later."""
    from hica_bench.files import cannot_write

    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    if hasattr(os, "posix_fallocate"):
        try:
            with path.open("r+b") as handle:
                os.posix_fallocate(handle.fileno(), 0, path.stat().st_size)
        except OSError as exc:
            raise cannot_write(path, exc) from None
    return array


class FolderDataset:
    """Images of one folder (or CSV manifest) at one size (implements ``hica_bench.interfaces.FewShotDataset``).
    ``decoded``: how many images this object decoded (0 when the cache had them).

    ``root``: a folder, or a .csv manifest, relative to the working folder (the spec offers it as an option, in place
    of the data root). ``name``: the dataset's name (the support sets are drawn by it); "" = the root folder's (or the
    CSV's folder's) name. ``exclude``: glob patterns (separated by ``|``) of files to leave out, matched on the name
    or the path below root. ``val_fraction`` / ``test_fraction`` / ``split_seed``: the seeded split of a folder
    without one; ``resize``: crop, pad or stretch to ``size``; ``skip_bad_images``: leave out (and count) unreadable
    files instead of stopping; ``window``: a DICOM image's grey levels by the file's own window or VOI LUT (``file``)
    or by the image's minimum and maximum (``min-max``, for windows that blank whole images)."""

    def __init__(self, root: str, size: int, cache_dir: Path, *, name: str = "", exclude: str = "", val_fraction: float = 0.1,
                 test_fraction: float = 0.2, split_seed: int = 0, resize: str = "crop", skip_bad_images: bool = False,
                 window: str = "file", download: bool = True) -> None:
        if not root:
            raise UserError("the folder dataset needs root=PATH: a folder of class folders, of train/val/test "
                            "folders, or a CSV manifest (e.g. --datasets folder:root=data/busi)")
        self.root = Path(root).expanduser()
        if val_fraction + test_fraction >= 1:
            raise UserError(f"folder: val_fraction + test_fraction must leave images for training, got "
                            f"{val_fraction:g} + {test_fraction:g}")
        self.size, self.resize, self.window = size, resize, window
        found = layout.find(self.root, exclude, val_fraction, test_fraction, split_seed)
        # a CSV's dataset is named after its folder (manifests are called labels.csv, split.csv...): the split.csv a
        # seeded split records, put in the dataset's root, then has the folder's name, hence its support sets
        self.name = name or (self.root.resolve().parent.name if self.root.is_file() else self.root.resolve().name) or "folder"
        self.class_names = found.classes
        self.task = "multi-label" if found.multilabel else "binary-class" if len(self.class_names) == 2 else "multi-class"
        self.multilabel = found.multilabel
        self.layout, self.split_by = found.kind, found.split_by
        if len(self.class_names) < 2:
            raise UserError(f"{self.root} has one class ({self.class_names[0]}); a classification dataset needs two or more")
        for split in ("train", "test"):  # every class in both, else its AUC (and the protocol) is undefined
            missing = [c for c in self.class_names if not any(found.has(e, c) and e.split == split for e in found.entries)]
            if missing:
                why = (f"with test_fraction={test_fraction:g} of its images rounding to none; add images or raise "
                       "test_fraction" if split == "test" and found.split_by != "official" else f"in {self.root}")
                raise UserError(f"{self.root}: class {', '.join(missing)} has no {split} images ({why})")
        order = {name: i for i, name in enumerate(layout.SPLITS)}
        entries = sorted(found.entries, key=lambda e: order[e.split])  # stable: train, val, test, each in its order
        cache_dir = Path(cache_dir)
        hashes = self._digests(entries, cache_dir)
        key = digest(["folder", DECODER_VERSION, size, resize, skip_bad_images,
                      [[e.name, e.label, e.split, h] for e, h in zip(entries, hashes)]]
                     + ([{"window": window}] if window != "file" else []))  # the default keeps earlier identities
        self.identity = f"folder/{self.name}@{size}/sha256:{key}"
        safe = re.sub(r"[^\w.-]+", "_", self.name)
        self.folder = cache_dir / "datasets" / f"{safe}-{size}px-{key[:20]}"
        self.decoded = 0
        if not self._open():
            self._decode(entries, skip_bad_images)
            if not self._open():
                raise UserError(f"the decoded copy of {self.root} in {self.folder} cannot be read back")
        if self.skipped:
            log.warning("%s: %d unreadable files left out (listed in %s)", self.root, len(self.skipped),
                        self.folder / "dataset.json")

    # ------------------------------------------------------------------ identity
    def _has(self, entry: layout.Entry, name: str) -> bool:
        return layout.has(entry, name, self.multilabel)

    def _digests(self, entries: list[layout.Entry], cache_dir: Path) -> list[str]:
        """Every file's sha256, remembered per file version under the cache folder (a second run reads no pixels)."""
        advance = data.progress(f"{self.name}: reading {len(entries)} files", len(entries))

        def one(entry: layout.Entry) -> str:
            try:
                return file_sha256(entry.path, cache_dir)
            except OSError as exc:
                raise UserError(f"{entry.path}: cannot be read ({exc.strerror or exc})") from None
        hashes = []
        with ThreadPoolExecutor(workers()) as pool:
            for value in pool.map(one, entries):
                hashes.append(value)
                advance(1)
        return hashes

    # ------------------------------------------------------------------ decoding (once)
    def _decode(self, entries: list[layout.Entry], skip_bad: bool) -> None:
        n, size = len(entries), self.size
        advance = data.progress(f"{self.name}: decoding {n} images at {size} px", n)
        with atomic_dir(self.folder) as partial:
            rgb = _new_array(partial / "rgb.npy", (n, size, size, 3))
            colour = np.zeros(n, bool)
            problems: list[tuple[int, str]] = []

            def one(i: int) -> None:
                try:
                    pixels = decode.decode(entries[i].path, size, self.resize, self.window)
                except decode.BadImage as exc:
                    problems.append((i, str(exc)))
                else:
                    colour[i] = pixels.ndim == 3
                    rgb[i] = pixels[..., None] if pixels.ndim == 2 else pixels
            with _decoders_quiet() as noted, ThreadPoolExecutor(workers()) as pool:
                for _ in pool.map(one, range(n)):
                    advance(1)
            if flat := sorted(noted[decode.FlatWindow]):
                log.warning("%s: %d DICOM files have a window that maps the whole image to one grey level (first: %s); "
                            "window=min-max scales them by their own range", self.root, len(flat), flat[0])
            if stray := sorted(noted[decode.StrayBytes]):
                log.warning("%s: %d DICOM files start with stray bytes before their data set (first: %s); they were "
                            "read from their first element", self.root, len(stray), stray[0])
            problems.sort()
            if problems and not skip_bad:
                i, why = problems[0]
                more = f" ({len(problems) - 1} more unreadable files)" if len(problems) > 1 else ""
                raise UserError(f"{entries[i].path} {why}{more}; fix or remove it, or pass --skip-bad-images "
                                "(or skip_bad_images=true) to leave such files out")
            bad = {i for i, _ in problems}
            keep = [i for i in range(n) if i not in bad]
            images = _new_array(partial / "images.npy",
                                (len(keep), size, size, 3) if colour.any() else (len(keep), size, size))
            for start in range(0, len(keep), 1024):  # grey datasets keep one channel; grey images in RGB ones are tripled
                rows = keep[start:start + 1024]
                images[start:start + len(rows)] = rgb[rows] if colour.any() else rgb[rows, ..., 0]
            images.flush()
            del images, rgb
            (partial / "rgb.npy").unlink()
            kept = [entries[i] for i in keep]
            for split in ("train", "test"):  # the files left out must not leave a class without images (as above)
                missing = [c for c in self.class_names if not any(self._has(e, c) and e.split == split for e in kept)]
                if missing:
                    raise UserError(f"{self.root}: with its {len(problems)} unreadable files left out "
                                    f"(--skip-bad-images), class {', '.join(missing)} has no {split} images; fix or "
                                    "replace those files")
            for i, why in problems:
                log.warning("skipped %s: %s", entries[i].path, why)
            if self.multilabel:  # (N, C) in {0, 1}
                labels = np.array([[int(self._has(e, c)) for c in self.class_names] for e in kept], np.int64).reshape(
                    len(kept), len(self.class_names))
            else:
                labels = np.array([self.class_names.index(e.label) for e in kept], np.int64)
            np.save(partial / "labels.npy", labels, allow_pickle=False)
            ranges, start = {}, 0
            for split in layout.SPLITS:
                count = sum(e.split == split for e in kept)
                ranges[split] = [start, start + count]
                start += count
            record = io.StringIO()
            writer = csv.writer(record, lineterminator="\n")
            writer.writerow(["path", "labels" if self.multilabel else "label", "split"])
            writer.writerows([e.name, e.label, e.split] for e in kept)
            (partial / "split.csv").write_text(record.getvalue(), encoding="utf-8")
            (partial / "dataset.json").write_text(json.dumps({
                "identity": self.identity, "root": str(self.root), "layout": self.layout, "split_by": self.split_by,
                "classes": self.class_names, "size": size, "resize": self.resize, "window": self.window, "channels": 3 if colour.any() else 1,
                "splits": ranges, "skipped": [[entries[i].name, why] for i, why in problems],
            }, indent=1), encoding="utf-8")
        self.decoded = n

    def _open(self) -> bool:
        """Map the decoded copy; False when there is none (or it was damaged: then it is removed)."""
        if not (self.folder / "dataset.json").is_file():
            return False
        try:
            record = json.loads((self.folder / "dataset.json").read_text(encoding="utf-8"))
            self.images = np.load(self.folder / "images.npy", mmap_mode="r", allow_pickle=False)
            self.labels = np.load(self.folder / "labels.npy", allow_pickle=False)
            self.ranges = {split: tuple(record["splits"][split]) for split in layout.SPLITS}
            self.skipped = record["skipped"]
            if len(self.images) != len(self.labels) or record["identity"] != self.identity:
                raise ValueError("images, labels and record disagree")
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged cache entry: decode again, never trust it
            log.warning("decoded copy %s is damaged (%s); decoding again", self.folder, exc)
            import shutil

            shutil.rmtree(self.folder, ignore_errors=True)
            return False
        return True

    @property
    def split_record(self) -> Path:
        """The CSV (path,label,split) of which file went to which split; give it as ``root=`` to pin the split."""
        return self.folder / "split.csv"

    def split(self, name: str) -> Split:
        if name not in layout.SPLITS:
            raise ValueError(f"split must be one of {layout.SPLITS}, got {name!r}")
        start, end = self.ranges[name]
        return Split(images=self.images[start:end], labels=self.labels[start:end])


SPECS = [
    PluginSpec(
        "dataset", "folder",
        "Your own images: root=FOLDER (ROOT/<class>/<file>, split by split_seed; or ROOT/{train,val,test}/<class>/<file>) "
        "or root=FILE.csv (path,label[,split]); PNG, JPEG, TIFF, BMP, DICOM; decoded once at --size into the cache",
        FolderDataset,
        {"val_fraction": Option(low=0, high=0.9), "test_fraction": Option(low=0, high=0.9, low_open=True),
         "split_seed": Option(low=0), "resize": Option(choices=("crop", "pad", "stretch")),
         "window": Option(choices=("file", "min-max"))},
        defaults={"root": ""},  # root is a fixed argument (the data root) without a default: offered as an option
    ),
]
