"""Which files make up a folder dataset, with which class and split: the three layouts.

- ``ROOT/{train,val,test}/<class>/<file>``: the official splits (``val`` may be absent; ``training``/``valid``/
  ``validation``/``testing`` are read as their short names, in any letter case);
- ``ROOT/<class>/<file>``: a seeded, stratified split (:func:`seeded_split`);
- a CSV manifest ``path,label[,split]`` (a header row naming the columns; paths relative to the CSV's folder; other
  columns are ignored): rows in file order; without a ``split`` column, the seeded split. A ``labels`` column instead
  of ``label`` makes a **multi-label** dataset: each image's labels separated by ``|`` (ChestX-ray14's
  ``Finding Labels`` convention), none for an image without a finding (an empty field, or ``No Finding``); the
  seeded split then stratifies by each image's combination of labels.

In folders, files are found recursively below each class folder; names starting with ``.`` (``.DS_Store``, macOS
``._`` files) are skipped, as are files whose suffix is not an image's (listed in a warning); a file without a suffix
counts when it is a DICOM file (``DICM`` at byte 128); links to class folders are followed, links below them not.
Within a class, files are in natural order of their path below
the root (numbers compared as numbers: ``img2`` before ``img10``). Classes are sorted by name (Python's string order,
i.e. by Unicode code point), numerically when every class name is a whole number; a class's label is its position.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import logging
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from hica_bench.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
SUFFIXES = PILLOW_SUFFIXES + DICOM_SUFFIXES
MAX_LABEL = 200  #: characters of a class name in a CSV manifest
MAX_PATH = 4096  #: characters of a path in a CSV manifest (PATH_MAX)
MAX_LABELS = 1000  #: labels of one image in a multi-label manifest


@dataclass(frozen=True)
class Entry:
    path: Path  #: the file
    name: str  #: its path below the root (POSIX), or as the CSV gives it
    label: str  #: its class name (multi-label: its labels, sorted, joined by ``|``; "" for none)
    split: str | None  #: train, val or test; None until :func:`seeded_split` assigns one


@dataclass
class Layout:
    kind: str  #: "split folders", "class folders" or "csv"
    classes: list[str]  #: sorted (see the module docstring)
    entries: list[Entry]  #: every file, each with its split
    split_by: str  #: "official" or the seeded split's description
    multilabel: bool = False  #: from a manifest's ``labels`` column (each image has any number of the classes)

    def has(self, entry: Entry, name: str) -> bool:
        """Whether ``entry`` is of class ``name`` (multi-label: has that label)."""
        return has(entry, name, self.multilabel)


def has(entry: Entry, name: str, multilabel: bool) -> bool:
    """Whether ``entry`` is of class ``name``; in a multi-label dataset, whether it has that label."""
    return name in entry.label.split("|") if multilabel else entry.label == name


def natural_key(text: str) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part)


def class_order(names: set[str]) -> list[str]:
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def find(root: Path, exclude: str = "", val_fraction: float = 0.1, test_fraction: float = 0.2,
         split_seed: int = 0) -> Layout:
    """The dataset at ``root``: a folder in one of the two folder layouts, or a ``.csv`` manifest."""
    if not root.exists():
        raise UserError(f"folder dataset root {str(root)!r} does not exist")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise UserError(f"folder dataset root {str(root)!r} is a file but not a .csv manifest")
        layout = _from_csv(root)
    else:
        layout = _from_folders(root, [p for p in exclude.split("|") if p])
    if any(entry.split is None for entry in layout.entries):
        layout.entries = seeded_split(layout.entries, layout.classes, val_fraction, test_fraction, split_seed)
        layout.split_by = (f"seeded stratified split (split_seed={split_seed}, val_fraction={val_fraction:g}, "
                           f"test_fraction={test_fraction:g})")
    return layout


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _is_dicom_without_suffix(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _unreadable(error: OSError) -> None:
    """os.walk's error handler: a subfolder that cannot be read would lose its images without a word."""
    raise UserError(f"cannot read folder {str(error.filename)!r} ({error.strerror or error}); its images would be "
                    "left out: give read access or exclude it")


def _images_below(folder: Path, root: Path, exclude: list[str], ignored: list[str]) -> list[tuple[Path, str]]:
    found = []
    # a class folder may be a link; links below it are not followed
    for current, dirs, files in os.walk(folder, onerror=_unreadable):
        dirs[:] = [d for d in dirs if _visible(d)]
        for name in files:
            if not _visible(name):
                continue
            path = Path(current) / name
            relative = path.relative_to(root).as_posix()
            if any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(relative, p) for p in exclude):
                continue
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)  # after links; a FIFO would hang the reader
            except OSError:
                regular = False  # a dangling link
            if not regular:
                ignored.append(f"{relative} (not a regular file)")
                continue
            suffix = path.suffix.lower()
            if suffix in SUFFIXES or (not suffix and _is_dicom_without_suffix(path)):
                found.append((path, relative))
            else:
                ignored.append(relative)
    return sorted(found, key=lambda item: natural_key(item[1]))


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p.name))
    except OSError as exc:
        raise UserError(f"cannot read folder {str(folder)!r} ({exc.strerror or exc})") from None


def _loose_images(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)


def _from_folders(root: Path, exclude: list[str]) -> Layout:
    expected = "expected ROOT/<class>/<image>, ROOT/{train,val,test}/<class>/<image> or a CSV manifest"
    folders = _subfolders(root)
    if not folders:
        raise UserError(f"folder dataset root {str(root)!r} holds no class folders ({expected})")
    splits = {f: SPLIT_NAMES.get(f.name.lower()) for f in folders}
    ignored: list[str] = []
    entries: list[Entry] = []
    if any(splits.values()):
        others = [f.name for f, s in splits.items() if s is None]
        if others:
            raise UserError(f"{str(root)!r} mixes split folders ({', '.join(f.name for f, s in splits.items() if s)}) "
                            f"with other folders ({', '.join(others)}); {expected}")
        named = {}
        for folder, split in splits.items():
            if split in named:
                raise UserError(f"{str(root)!r} has two folders for the {split} split: {named[split].name}, {folder.name}")
            named[split] = folder
        for needed in ("train", "test"):
            if needed not in named:
                raise UserError(f"{str(root)!r} has split folders ({', '.join(f.name for f in named.values())}) but no "
                                f"{needed} folder")
        for split in SPLITS:
            if split in named:
                entries += _class_folders(named[split], root, exclude, ignored, split)
        kind, split_by = "split folders", "official"
    else:
        entries = _class_folders(root, root, exclude, ignored, None)
        kind, split_by = "class folders", ""
    if ignored:
        shown = ", ".join(ignored[:3]) + (", ..." if len(ignored) > 3 else "")
        log.warning("%s: ignored %d files that are not images by their suffix (%s)", root, len(ignored), shown)
    once(entries, f"{str(root)!r}")
    classes = class_order({e.label for e in entries})
    return Layout(kind, classes, entries, split_by)


def once(entries: list[Entry], where: str) -> None:
    """Refuses an image file reached under two names (a class folder that links to the root or to another class, a
    hard link): it would count in two classes, or in train and test."""
    seen: dict[tuple[int, int], Entry] = {}
    for entry in entries:
        try:
            info = os.stat(entry.path)
        except OSError:
            continue  # reported when it is decoded
        first = seen.setdefault((info.st_dev, info.st_ino), entry)
        if first is not entry:
            raise UserError(f"{where}: {first.name} and {entry.name} are the same file (a link): an image may be "
                            "in one class and one split only; remove the link or exclude one of them")


def _class_folders(folder: Path, root: Path, exclude: list[str], ignored: list[str], split: str | None) -> list[Entry]:
    classes = _subfolders(folder)
    where = f"{str(folder)!r}"
    if not classes:
        raise UserError(f"{where} holds no class folders (expected {folder.name}/<class>/<image>)")
    loose = _loose_images(folder)
    if loose:
        raise UserError(f"{where} holds images outside class folders ({', '.join(loose[:3])}); put each image in the "
                        "folder of its class")
    entries = []
    for class_folder in classes:
        found = _images_below(class_folder, root, exclude, ignored)
        if not found:
            raise UserError(f"class folder {str(class_folder)!r} holds no images (PNG, JPEG, TIFF, BMP or DICOM)")
        entries += [Entry(path, relative, class_folder.name, split) for path, relative in found]
    return entries


def _from_csv(manifest: Path) -> Layout:
    where = str(manifest)
    try:
        text = manifest.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel's UTF-8 CSV) is not a column name
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"manifest {where} cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        rows = iter(list(csv.reader(text.splitlines())))
    except csv.Error as exc:  # a field longer than csv's limit (131,072 characters), a NUL byte
        raise UserError(f"manifest {where} is not a CSV this reads ({' '.join(str(exc).split())[:120]})") from None
    header = next(rows, None)
    if not header:
        raise UserError(f"manifest {where} is empty; it needs a header row path,label[,split] and one row per image")
    columns = [c.strip().lower() for c in header]
    multilabel = "labels" in columns and "label" not in columns
    missing = [c for c in ("path", "labels" if multilabel else "label") if c not in columns]
    if missing:
        raise UserError(f"manifest {where}: the header row names no {' and no '.join(missing)} column "
                        f"(it has: {', '.join(header)}); expected path,label[,split] (or path,labels[,split])")
    at = {name: columns.index(name) for name in ("path", "label", "split") if name in columns}
    if multilabel:
        at["label"] = columns.index("labels")
    entries: list[Entry] = []
    seen: dict[Path, tuple[int, str]] = {}
    for line, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(columns):
            raise UserError(f"manifest {where} line {line}: {len(row)} fields, the header has {len(columns)}")
        name, label = row[at["path"]].strip(), row[at["label"]].strip()
        if multilabel:  # canonical: sorted, each once, "" for none
            found = {part.strip() for part in label.split("|")} - {""}
            label = "" if {f.casefold() for f in found} <= {"no finding"} else "|".join(sorted(found))
            if len(found) > MAX_LABELS:
                raise UserError(f"manifest {where} line {line}: {len(found)} labels; at most {MAX_LABELS}")
        if not name or (not label and not multilabel):
            raise UserError(f"manifest {where} line {line}: empty {'path' if not name else 'label'}")
        if max(map(len, label.split("|"))) > MAX_LABEL or len(name) > MAX_PATH:
            what, length, most = ("label", len(label), MAX_LABEL) if len(label) > MAX_LABEL else ("path", len(name), MAX_PATH)
            raise UserError(f"manifest {where} line {line}: a {what} of {length:,} characters; at most {most:,}")
        if "\0" in name:
            raise UserError(f"manifest {where} line {line}: the path holds a NUL byte")
        split = None
        if "split" in at:
            given = row[at["split"]].strip()
            split = SPLIT_NAMES.get(given.lower())
            if split is None:
                raise UserError(f"manifest {where} line {line}: unknown split {given!r} (use train, val or test)")
        path = (manifest.parent / name).resolve() if not Path(name).is_absolute() else Path(name)
        if path in seen:
            first, first_label = seen[path]
            if first_label != label:
                raise UserError(f"manifest {where} line {line}: {name} is in two classes ({first_label!r} on line "
                                f"{first}, {label!r} here)")
            raise UserError(f"manifest {where} line {line}: {name} is listed twice (also on line {first})")
        if not path.is_file():
            raise UserError(f"manifest {where} line {line}: no file {name} (paths are relative to the CSV's folder)")
        seen[path] = (line, label)
        entries.append(Entry(path, name, label, split))
    if not entries:
        raise UserError(f"manifest {where} lists no images")
    classes = class_order({part for e in entries for part in e.label.split("|") if part} if multilabel
                          else {e.label for e in entries})
    if len(classes) < 2:
        raise UserError(f"manifest {where} has one class ({classes[0]}); a classification dataset needs two or more")
    if "split" in at:
        found = {e.split for e in entries}
        for needed in ("train", "test"):
            if needed not in found:
                raise UserError(f"manifest {where}: no row is in the {needed} split")
    return Layout("csv", classes, entries, "official" if "split" in at else "", multilabel)


def seeded_split(entries: list[Entry], classes: list[str], val_fraction: float, test_fraction: float,
                 seed: int) -> list[Entry]:
    """Each class's files in test, val and train: ``round(n * test_fraction)`` to test and ``round(n * val_fraction)``
    to val (halves rounded up; at least one image stays in train), chosen in the order of ``sha256("SEED:NAME")``
    of each file's name. The split depends only on the seed and the names, so it is the same on every platform and
    with every library version; adding or removing a file leaves the order of the others as it was, so at most the
    few files of its class at a split's boundary move (as the counts change)."""
    by_class: dict[str, list[Entry]] = {c: [] for c in classes}
    for entry in entries:  # (multi-label: by each image's combination of labels)
        by_class.setdefault(entry.label, []).append(entry)
    assigned: dict[int, str] = {}
    for members in by_class.values():
        n = len(members)
        n_test = min(math.floor(n * test_fraction + 0.5), n - 1)
        n_val = min(math.floor(n * val_fraction + 0.5), n - 1 - n_test)
        ranked = sorted(members, key=lambda e: hashlib.sha256(f"{seed}:{e.name}".encode()).hexdigest())
        for position, entry in enumerate(ranked):
            assigned[id(entry)] = "test" if position < n_test else "val" if position < n_test + n_val else "train"
    return [Entry(e.path, e.name, e.label, assigned[id(e)]) for e in entries]
