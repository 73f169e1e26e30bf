"""The ``folder`` dataset on real BreastMNIST images written as PNG, JPEG and DICOM files (pydicom), and prompt files.

The central claim: a folder (or CSV manifest) of the same images gives the ``.npz`` path's images bit for bit
(lossless formats), hence the same features and the same metrics; a second run decodes nothing; any change to a file
makes another dataset identity."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import invoke

from hica_bench.errors import UserError
from hica_bench.extraction import FeatureExtractor, Requested
from hica_bench.registry import load_registry
from hica_bench.testing import check_dataset

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (ExplicitVRLittleEndian, JPEGLSLossless, RLELossless, SecondaryCaptureImageStorage,  # noqa: E402
                         generate_uid)

SPLITS = ("train", "val", "test")
NAMES = ("malignant", "normal")  # BreastMNIST's labels 0 and 1, as folder names


@pytest.fixture(autouse=True)
def _test_plugins(monkeypatch):
    from conftest import TEST_PLUGINS

    monkeypatch.syspath_prepend(str(TEST_PLUGINS))


@pytest.fixture(scope="module")
def breast(medmnist_root) -> dict[str, np.ndarray]:
    with np.load(medmnist_root / "breastmnist.npz") as npz:
        return {key: npz[key] for key in npz.files}


def write_dicom(path: Path, pixels: np.ndarray, *, bits: int = 8, monochrome1: bool = False, window=None,
                slope=None, intercept=None, signed: bool = False, compress=None, pixel_data: bool = True) -> Path:
    """A single-frame secondary-capture DICOM file, as a scanner's export would be (pydicom's writer)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "US"
    if pixel_data:
        ds.set_pixel_data(pixels, "MONOCHROME1" if monochrome1 else "MONOCHROME2", bits)
        ds.PixelRepresentation = 1 if signed else 0
    else:
        ds.Rows, ds.Columns = pixels.shape
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if compress is not None:
        ds.compress(compress, encoding_plugin="pydicom")
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def as_dicom(path: Path, x: np.ndarray, variant: int) -> Path:
    """``x`` (uint8) in one of five encodings that must all decode back to ``x`` exactly (see decode.py): 8-bit with a
    full-range window; MONOCHROME1 (stored inverted); 16-bit with a full-range window; signed with a rescale slope and
    intercept; RLE-compressed."""
    if variant == 0:
        return write_dicom(path, x, window=(128, 256))
    if variant == 1:
        return write_dicom(path, 255 - x, monochrome1=True, window=(128, 256))
    if variant == 2:
        return write_dicom(path, x.astype(np.uint16) * 257, bits=16, window=(32768, 65536))
    if variant == 3:  # stored s = 4x - 1000, modality value s * 0.25 + 250 = x
        return write_dicom(path, (x.astype(np.int16) * 4 - 1000), bits=16, signed=True, slope=0.25, intercept=250,
                           window=(128, 256))
    return write_dicom(path, x, window=(128, 256), compress=RLELossless)


def write_manifest(root: Path, arrays: dict, fmt: str) -> Path:
    """Every BreastMNIST image as a file under ``root`` plus ``root/manifest.csv`` (path,label,split) in the ``.npz``
    order, so the supports drawn are those of the ``.npz`` path."""
    rows = ["path,label,split"]
    for split in SPLITS:
        for i, (x, y) in enumerate(zip(arrays[f"{split}_images"], arrays[f"{split}_labels"][:, 0])):
            name = f"{split}/{NAMES[y]}/{i:04d}.{fmt}"
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if fmt == "dcm":
                as_dicom(path, x, i % 5)
            else:
                Image.fromarray(x).save(path, **({"quality": 95} if fmt == "jpg" else {}))
            rows.append(f"{name},{NAMES[y]},{split}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def folder(root, cache: Path, size: int = 28, **options):
    registry = load_registry()
    text = ":".join([f"folder:root={root}", *(f"{k}={v}" for k, v in options.items())])
    return registry.choose("dataset", text).build(root=None, size=size, download=False, cache_dir=cache)


def test_png_and_dicom_give_the_npz_images_features_and_metrics(breast, medmnist_root, tmp_path):
    png = write_manifest(tmp_path / "png", breast, "png")
    dcm = write_manifest(tmp_path / "dcm", breast, "dcm")
    cache = tmp_path / "cache"
    npz = load_registry().choose("dataset", "breastmnist").build(root=str(medmnist_root), size=28, download=False,
                                                                 cache_dir=cache)
    datasets = {"png": folder(png, cache, name="breastmnist"), "dcm": folder(dcm, cache, name="breastmnist")}
    pair = _pixels_pair()
    fixed = Requested(backend="eager", batch_size=32, channels_last=False, threads=1)
    reference = {s: FeatureExtractor(pair, cache, fixed).features(npz, s)[0] for s in ("train", "test")}
    for fmt, dataset in datasets.items():
        check_dataset(dataset)
        assert dataset.class_names == list(NAMES) and dataset.task == "binary-class"
        for split in SPLITS:
            got = dataset.split(split)
            assert np.array_equal(got.images, breast[f"{split}_images"]), (fmt, split)  # bit for bit
            assert np.array_equal(got.labels, breast[f"{split}_labels"][:, 0])
        for split in ("train", "test"):
            features, record = FeatureExtractor(pair, cache, fixed).features(dataset, split)
            assert not record.cached and np.array_equal(features, reference[split]), (fmt, split)
    assert len({npz.identity, *(d.identity for d in datasets.values())}) == 3  # each its own dataset identity

    out = tmp_path / "out"
    # the support sets are drawn by the dataset's name: named as the .npz set, the folders get its supports
    png_label, dcm_label = f"folder:name=breastmnist:root={png}", f"folder:name=breastmnist:root={dcm}"
    code, stdout, err = invoke("-p", "pixel_encoder", "run", "--no-report", "--datasets", f"breastmnist,{png_label},{dcm_label}",
                               "--methods", "linear-probe,prototype", "--encoders", "pixels", "--shots", "1,5",
                               "--seeds", "0,1", "--data-root", medmnist_root, "--cache-dir", cache, "--out", out, "-q")
    assert code == 0, err
    assert f"{png_label}: 2 classes: 0=malignant, 1=normal; 546 train, 78 val, 156 test" in stdout
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_dataset: dict[str, dict] = {}
    for r in records:
        by_dataset.setdefault(r["key"]["dataset"], {})[(r["key"]["method"], r["key"]["k"], r["key"]["seed"])] = r
    assert len(by_dataset) == 3 and all(len(cells) == 8 for cells in by_dataset.values())
    first, *others = by_dataset.values()
    for cells in others:
        for cell, r in cells.items():
            assert r["status"] == "ok" and r["metrics"] == first[cell]["metrics"], cell  # the same numbers
            assert r["identity"]["support"] == first[cell]["identity"]["support"]  # from the same supports


def test_jpeg_is_close_to_the_npz_images(breast, tmp_path):
    dataset = folder(write_manifest(tmp_path / "jpg", breast, "jpg"), tmp_path / "cache")
    decoded, original = dataset.split("test").images.astype(int), breast["test_images"].astype(int)
    assert decoded.shape == original.shape and 0 < np.abs(decoded - original).mean() < 2.0  # lossy, quality 95


def test_a_second_run_decodes_nothing_and_any_file_change_is_a_new_identity(breast, tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    for split in ("train", "test"):
        for i in range(40):
            x, y = breast[f"{split}_images"][i], breast[f"{split}_labels"][i, 0]
            Image.fromarray(x).save((root / split / NAMES[y]).mkdir(parents=True, exist_ok=True) or
                                    root / split / NAMES[y] / f"{i}.png")
    first = folder(root, cache)
    assert first.decoded == 80 and len(first.split("val").labels) == 0
    stamp = (first.folder / "images.npy").stat().st_mtime_ns
    again = folder(root, cache)
    assert again.decoded == 0 and again.identity == first.identity  # decoded nothing: the same memory map
    assert (again.folder / "images.npy").stat().st_mtime_ns == stamp
    assert np.array_equal(again.split("train").images, first.split("train").images)

    identities = {first.identity}
    victim = next((root / "train" / "normal").iterdir())
    pixels = np.asarray(Image.open(victim))
    Image.fromarray(255 - pixels).save(victim)  # the same name, other pixels
    changed = folder(root, cache)
    identities.add(changed.identity)
    shutil.copy(victim, victim.with_name("added.png"))
    identities.add(folder(root, cache).identity)
    victim.unlink()
    identities.add(folder(root, cache).identity)
    assert len(identities) == 4 and changed.decoded == 80


def test_class_folders_get_a_seeded_stratified_split_recorded_and_reproducible(breast, tmp_path):
    root, cache = tmp_path / "busi", tmp_path / "cache"
    images, labels = breast["train_images"], breast["train_labels"][:, 0]
    for i, (x, y) in enumerate(zip(images, labels)):
        path = root / NAMES[y] / f"img ({i}).png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x).save(path)
    dataset = folder(root, cache)
    sizes = {s: np.bincount(dataset.split(s).labels, minlength=2) for s in SPLITS}
    per_class = np.bincount(labels, minlength=2)
    assert (sizes["train"] + sizes["val"] + sizes["test"] == per_class).all()
    assert np.array_equal(sizes["test"], np.floor(per_class * 0.2 + 0.5)) and np.array_equal(sizes["val"], np.floor(per_class * 0.1 + 0.5))
    assert "seeded stratified split (split_seed=0" in dataset.split_by

    record = dataset.split_record.read_text().splitlines()
    assert record[0] == "path,label,split" and len(record) == 1 + len(labels)
    assert folder(root, cache).identity == dataset.identity  # the same split every time
    other = folder(root, cache, split_seed=1)
    assert other.identity != dataset.identity and not np.array_equal(other.split("test").images, dataset.split("test").images)
    # pinning: the recorded split.csv, put in the root, gives the same images in every split
    shutil.copy(dataset.split_record, root / "split.csv")
    pinned = folder(root / "split.csv", cache)
    for s in SPLITS:
        assert np.array_equal(pinned.split(s).images, dataset.split(s).images)
    # adding a file keeps the others' order: at most the files of its class at a split boundary move
    Image.fromarray(images[0]).save(root / NAMES[labels[0]] / "new.png")
    grown = folder(root, cache)
    before = {row.split(",")[0]: row.split(",")[2] for row in record[1:]}
    after = {row.split(",")[0]: row.split(",")[2] for row in grown.split_record.read_text().splitlines()[1:]}
    moved = [name for name in before if after[name] != before[name]]
    assert len(after) == len(before) + 1 and len(moved) <= 2 and all(NAMES[labels[0]] in name for name in moved)


def test_dicom_windowing_rescale_monochrome1_and_16_bit_without_a_window(breast, tmp_path):
    from hica_bench_folder.decode import decode

    x = breast["test_images"][3]
    for variant in range(5):
        assert np.array_equal(decode(as_dicom(tmp_path / f"v{variant}.dcm", x, variant), 28), x), variant
    wide = (x.astype(np.uint16) * 16 + 100)  # 12-bit data, no window: the image's own minimum and maximum
    expected = np.rint((wide - wide.min()) * (255.0 / (wide.max() - wide.min()))).astype(np.uint8)
    assert np.array_equal(decode(write_dicom(tmp_path / "w.dcm", wide, bits=16), 28), expected)
    # a narrow window (a soft-tissue window, say): the DICOM linear function, PS3.3 C.11.2.1.2.1
    c, w = 100.0, 60.0
    values = x.astype(float)
    windowed = np.where(values <= c - 0.5 - (w - 1) / 2, 0, np.where(values > c - 0.5 + (w - 1) / 2, 255,
                        ((values - (c - 0.5)) / (w - 1) + 0.5) * 255))
    assert np.array_equal(decode(write_dicom(tmp_path / "n.dcm", x, window=(c, w)), 28), np.rint(windowed).astype(np.uint8))


def test_pillow_conversions_16_bit_rgb_alpha_and_resizing(breast, tmp_path):
    from hica_bench_folder.decode import decode

    x = breast["test_images"][5]
    sixteen = x.astype(np.uint16) * 64 + 7  # a 16-bit PNG using 14 of its bits
    Image.fromarray(sixteen).save(tmp_path / "16.png")
    expected = np.rint((sixteen - sixteen.min()) * (255.0 / (sixteen.max() - sixteen.min()))).astype(np.uint8)
    assert np.array_equal(decode(tmp_path / "16.png", 28), expected)
    Image.fromarray(np.stack([x] * 3, -1)).save(tmp_path / "grey-as-rgb.png")
    assert decode(tmp_path / "grey-as-rgb.png", 28).shape == (28, 28)  # equal channels: grey
    colour = np.stack([x, 255 - x, x // 2], -1)
    Image.fromarray(colour).convert("RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(decode(tmp_path / "rgba.png", 28), colour)  # alpha dropped
    Image.fromarray(colour).save(tmp_path / "c.tiff")
    Image.fromarray(colour).save(tmp_path / "c.bmp")
    assert np.array_equal(decode(tmp_path / "c.tiff", 28), colour) and np.array_equal(decode(tmp_path / "c.bmp", 28), colour)

    wide = np.zeros((28, 56), np.uint8)
    wide[:, 14:42] = x  # the centre square is the image, the sides black
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert np.array_equal(decode(tmp_path / "wide.png", 28, "crop"), x)  # centred crop, already at size: no resampling
    padded = decode(tmp_path / "wide.png", 28, "pad")
    assert padded.shape == (28, 28) and padded[:5].max() == 0 and padded[-5:].max() == 0  # black bands top and bottom
    stretched = decode(tmp_path / "wide.png", 28, "stretch")
    assert stretched.shape == (28, 28) and stretched[:, :5].max() < 20  # the black sides squeezed, still there
    expected = np.asarray(Image.fromarray(x).resize((64, 64), Image.Resampling.BICUBIC))
    assert np.array_equal(decode(tmp_path / "wide.png", 64, "crop"), expected)  # Pillow's bicubic, as documented


def test_mixed_grey_and_rgb_make_an_rgb_dataset_with_grey_images_tripled(breast, tmp_path):
    root = tmp_path / "mixed"
    for split in ("train", "test"):
        for i in range(6):
            x, y = breast[f"{split}_images"][i], i % 2
            path = root / split / NAMES[y] / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.stack([x, x // 2, x], -1) if i == 0 else x).save(path)
    dataset = folder(root, tmp_path / "cache")
    images = dataset.split("test").images
    assert images.shape == (6, 28, 28, 3)
    grey = [i for i in range(6) if (images[i, ..., 0] == images[i, ..., 1]).all()]
    assert len(grey) == 5  # every grey file tripled, the colour one kept


def _pixels_pair():
    import sys

    from conftest import TEST_PLUGINS

    sys.path.insert(0, str(TEST_PLUGINS))
    try:
        from pixel_encoder import PixelEncoder
    finally:
        sys.path.remove(str(TEST_PLUGINS))
    from hica_bench.interfaces import EncoderPair

    return EncoderPair(PixelEncoder(), None, False, "cpu")


# --------------------------------------------------------------------------- bad input: one line, exit 2, nothing lost


def _tree(root: Path, breast, per_class=(6, 6), split_folders=True):
    for split in ("train", "test") if split_folders else (None,):
        for c, n in enumerate(per_class):
            for i in range(n):
                path = (root / split if split else root) / NAMES[c] / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(breast["train_images"][i]).save(path)
    return root


def _break(kind: str, root: Path, breast) -> str:
    """Make ``root`` bad in one way; returns the --datasets text."""
    if kind == "empty root":
        root.mkdir()
    elif kind == "empty class folder":
        _tree(root, breast)
        (root / "train" / "benign").mkdir()
    elif kind == "fewer images than k":
        _tree(root, breast, per_class=(6, 3))
    elif kind in ("not an image", "truncated"):
        _tree(root, breast)
        bad = root / "train" / "normal" / "bad.png"
        if kind == "not an image":
            bad.write_text("patient notes, not pixels")
        else:
            data = (root / "train" / "normal" / "0.png").read_bytes()
            bad.write_bytes(data[: len(data) // 2])
    elif kind == "dicom without pixel data":
        _tree(root, breast)
        write_dicom(root / "test" / "normal" / "x.dcm", breast["test_images"][0], pixel_data=False)
    elif kind == "dicom with a zero window width":
        _tree(root, breast)
        write_dicom(root / "test" / "normal" / "x.dcm", breast["test_images"][0], window=(128, 0))
    elif kind == "class without test images":
        _tree(root, breast)
        shutil.rmtree(root / "test" / "normal")
    elif kind == "dicom needing a decoder":
        _tree(root, breast)
        path = write_dicom(root / "test" / "normal" / "x.dcm", breast["test_images"][0])
        ds = pydicom.dcmread(path)
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 64])
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless
        ds.save_as(path, enforce_file_format=True)
    elif kind.startswith("csv"):
        _tree(root, breast)
        rows = ["path,label,split", "train/malignant/0.png,malignant,train", "test/normal/0.png,normal,test"]
        rows += [f"{s}/{n}/{i}.png,{n},{s}" for s in ("train", "test") for n in NAMES for i in range(1, 6)]
        rows.append({"csv missing file": "train/normal/nope.png,normal,train",
                     "csv unknown split": "train/normal/0.png,normal,tset",
                     "csv path in two classes": "train/malignant/0.png,normal,train"}[kind])
        (root / "m.csv").write_text("\n".join(rows) + "\n")
        return f"folder:root={root / 'm.csv'}"
    elif kind.startswith("prompts"):
        _tree(root, breast)
        text = {"prompts with three classnames": "classnames: [a, b, c]\n",
                "prompts unreadable yaml": "classnames: [a, b\n  templates: {\n"}[kind]
        (root.parent / "p.yaml").write_text(text)
        return f"folder:root={root}:prompts={root.parent / 'p.yaml'}"
    return f"folder:root={root}"


BAD = {
    "empty root": "holds no class folders",
    "empty class folder": "class folder",
    "fewer images than k": "",
    "not an image": "bad.png is not an image Pillow can read",
    "truncated": "bad.png is truncated or corrupt",
    "dicom without pixel data": "x.dcm is a DICOM file without pixel data",
    "dicom needing a decoder": "pip install pylibjpeg",
    "dicom with a zero window width": "x.dcm cannot be decoded (ValueError",
    "class without test images": "class normal has no test images",
    "csv missing file": "line 24: no file train/normal/nope.png",
    "csv unknown split": "unknown split 'tset'",
    "csv path in two classes": "is in two classes",
    "prompts with three classnames": "classnames has 3 names but",
    "prompts unreadable yaml": "not valid YAML",
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, medmnist_root):
    """A finished run (BreastMNIST) whose results file each bad input must leave as it was."""
    from conftest import TEST_PLUGINS

    base = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as patch:  # -p pixel_encoder (the autouse fixture is set up after this one)
        patch.syspath_prepend(str(TEST_PLUGINS))
        code, _, err = invoke("-p", "pixel_encoder", "run", "--no-report", "--datasets", "breastmnist", "--methods", "prototype",
                              "--encoders", "pixels", "--shots", "1,5", "--seeds", "0", "--data-root", medmnist_root,
                              "--cache-dir", base / "cache", "--out", base / "out", "-q")
    assert code == 0, err
    return base


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_folder_input_is_one_line_exit_2_and_loses_nothing(kind, breast, finished, tmp_path):
    datasets = _break(kind, tmp_path / "data", breast)
    out = tmp_path / "out"
    shutil.copytree(finished / "out", out)
    before = (out / "results.jsonl").read_bytes()
    code, _, err = invoke("-p", "pixel_encoder", "run", "--datasets", f"breastmnist,{datasets}", "--methods", "prototype",
                          "--encoders", "pixels", "--shots", "1,5", "--seeds", "0", "--cache-dir", finished / "cache",
                          "--out", out)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("hica-bench: error: ") and BAD[kind] in lines[0], lines[0]
    if kind == "fewer images than k":
        assert "normal" in lines[0] and "5" in lines[0], lines[0]
    assert (out / "results.jsonl").read_bytes() == before


def test_skip_bad_images_leaves_them_out_and_counts_them(breast, tmp_path):
    label = _break("not an image", tmp_path / "data", breast)
    code, stdout, err = invoke("-p", "pixel_encoder", "run", "--no-report", "--datasets", label, "--methods", "prototype",
                               "--encoders", "pixels", "--shots", "1", "--seeds", "0", "--cache-dir", tmp_path / "cache",
                               "--out", tmp_path / "out", "--skip-bad-images", "-q")
    assert code == 0, err
    assert "skipped" in err and "bad.png" in err and "1 unreadable files left out" in err
    assert "12 train, 0 val, 12 test" in stdout  # 13 files in train, the unreadable one left out
    record = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[0])
    assert record["key"]["dataset"] == f"{label}:skip_bad_images=True"


# --------------------------------------------------------------------------- prompt files


def test_a_prompt_file_reaches_zero_shot_and_is_part_of_the_identity(breast, medmnist_root, tmp_path):
    prompts = tmp_path / "breast.yaml"
    prompts.write_text("classnames: {malignant: breast cancer, 'normal, benign': benign breast tissue}\n"
                       "templates: ['an ultrasound of {}.', 'a breast scan showing {}.']\n")
    common = ["-p", "toy_aligned_encoder", "run", "--methods", "zero-shot,prototype", "--encoders", "toy-aligned",
              "--shots", "1", "--seeds", "0", "--data-root", medmnist_root, "--cache-dir", tmp_path / "cache",
              "--out", tmp_path / "out", "-q"]
    code, _, err = invoke(*common, "--datasets", f"breastmnist,breastmnist:prompts={prompts}")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    plain = {r["key"]["method"]: r for r in records if r["key"]["dataset"] == "breastmnist"}
    given = {r["key"]["method"]: r for r in records if r["key"]["dataset"] == f"breastmnist:prompts={prompts}"}
    assert given["zero-shot"]["fit_info"] == {"templates": 2, "class_names": ["breast cancer", "benign breast tissue"],
                                              "prompt_file": str(prompts)}
    assert plain["zero-shot"]["fit_info"]["class_names"] == ["malignant", "normal, benign"]
    assert given["zero-shot"]["metrics"] != plain["zero-shot"]["metrics"]  # other texts, other predictions
    assert given["prototype"]["metrics"] == plain["prototype"]["metrics"]  # image features only: unchanged numbers
    for method in ("zero-shot", "prototype"):  # ... but every cell with a prompt file is its own identity
        assert given[method]["identity"]["origin"]["prompts"] and plain[method]["identity"]["origin"]["prompts"] is None
        assert given[method]["origin_id"] != plain[method]["origin_id"]
    digest = given["zero-shot"]["identity"]["origin"]["prompts"]
    prompts.write_text(prompts.read_text() + "# a comment changes no prompt\n")
    code, _, err = invoke(*common, "--datasets", f"breastmnist:prompts={prompts}")
    assert code == 0 and "0 ran ok" in _, err  # the same content: every cell already finished
    prompts.write_text(prompts.read_text().replace("an ultrasound of", "an echogram of"))
    code, stdout, err = invoke(*common, "--datasets", f"breastmnist:prompts={prompts}")
    assert code == 0 and "2 ran ok" in stdout, err  # another template: both cells run again
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert records[-1]["identity"]["origin"]["prompts"] != digest


def test_hica_uses_the_prompt_files_descriptors(breast, medmnist_root, tmp_path):
    prompts = tmp_path / "d.json"
    prompts.write_text(json.dumps({"descriptors": {"malignant": {"global": ["an irregular spiculated mass."],
                                                                 "local": ["angular margins.", "posterior shadowing."]}}}))
    code, _, err = invoke("-p", "toy_aligned_encoder", "run", "--no-report", "--datasets", f"breastmnist:prompts={prompts}",
                          "--methods", "hica:stage1=false:epochs=5", "--encoders", "toy-aligned", "--shots", "1",
                          "--seeds", "0", "--data-root", medmnist_root, "--cache-dir", tmp_path / "cache",
                          "--out", tmp_path / "out", "-q")
    assert code == 0, err
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert record["status"] == "ok" and record["fit_info"] == {"descriptors": f"prompt file {prompts} (others: knowledge)"}


def test_a_prompt_mapping_may_name_numbered_classes_as_numbers(tmp_path):
    from hica_bench import prompts

    (tmp_path / "grades.yaml").write_text("classnames: {0: no retinopathy, 1: mild, 2: severe}\n")
    loaded = prompts.load(tmp_path / "grades.yaml", ["0", "1", "2"], "retinamnist")
    assert loaded.classnames == ("no retinopathy", "mild", "severe")


@pytest.mark.parametrize("name, classes", [("busi.yaml", ["benign", "malignant", "normal"]),
                                            ("kermany.yaml", ["NORMAL", "PNEUMONIA"])])
def test_the_shipped_prompt_files_fit_their_datasets_folders(name, classes):
    from hica_bench import prompts

    from conftest import REPO

    loaded = prompts.load(REPO / "prompts" / name, classes, name)
    assert len(loaded.classnames) == len(classes) and loaded.templates and all(d for d in loaded.descriptors)
    with pytest.raises(UserError, match="classnames maps"):
        prompts.load(REPO / "prompts" / name, [c.upper() + "X" for c in classes], name)


# --------------------------------------------------------------------------- the documented commands, as written


def _readme_commands() -> list[str]:
    """The commands of the own-data page's worked example (docs/own-data.md), in the order written."""
    from conftest import REPO

    text = (REPO / "docs" / "own-data.md").read_text()
    section = text.split("## BUSI and the Kermany chest X-rays, as they come", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in section.split("```bash")[1:]:
        for line in block.split("```", 1)[0].splitlines():
            line = line.split("    #", 1)[0].strip()
            if line.startswith(("hica-bench ", "python ")):
                commands.append(line)
    return commands


@pytest.mark.slow
@pytest.mark.timeout(900)  # two default-suite runs of 270 cells at 224 px (each allowed 600 s below)
def test_the_documented_own_data_commands_work_as_written(medmnist_root, tmp_path, default_encoder_cache):
    """The own-data page's worked example (docs/own-data.md), its commands verbatim, in a folder holding the
    repository's prompts/ and examples/: first the example folders (BUSI's and Kermany's layouts), then the two runs."""
    import subprocess
    import sys

    from conftest import REPO

    commands = _readme_commands()
    assert [c.split()[0:2] for c in commands] == [["hica-bench", "run"], ["hica-bench", "run"], ["python", "examples/make_example_folders.py"]]
    for name in ("prompts", "examples"):
        shutil.copytree(REPO / name, tmp_path / name)
    # the cache the other default-encoder tests share: the encoder's settings probe and ONNX export are made once
    env = {**os.environ, "HICA_BENCH_DATA": str(medmnist_root), "HICA_BENCH_CACHE": str(default_encoder_cache),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    printed = {}
    for command in [commands[2], *commands[:2]]:
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (command, done.stderr[-3000:])
        printed[command.split("--out ")[-1]] = done.stdout
    for run, classes in (("busi", "3 classes: 0=benign ('benign breast lesion')"), ("kermany", "2 classes: 0=NORMAL")):
        assert classes in printed[f"runs/{run}"]
        records = [json.loads(line) for line in (tmp_path / "runs" / run / "results.jsonl").read_text().splitlines()]
        ok = [r for r in records if r["status"] == "ok"]
        assert len(records) == 270 and len(ok) == 90 and all(r["identity"]["origin"]["prompts"] for r in records)
        assert (tmp_path / "runs" / run / "leaderboard.md").is_file()
    kermany = [json.loads(line) for line in (tmp_path / "runs" / "kermany" / "results.jsonl").read_text().splitlines()]
    assert {r["n_test"] for r in kermany} == {40}  # 20 real test X-rays per class, from PneumoniaMNIST's test split


def test_a_multilabel_csv_manifest_is_a_multilabel_dataset_and_runs(breast, medmnist_root, tmp_path):
    """A manifest with a ``labels`` column (ChestX-ray14's ``|``-separated findings, ``No Finding`` for none): a
    multi-label dataset, labels (N, L) in {0, 1}, a seeded split stratified by label combination and recorded with its
    labels, and a run that scores each finding one-vs-rest."""
    rng = np.random.default_rng(2)
    names = ["effusion", "mass", "nodule"]
    root = tmp_path / "cxr"
    root.mkdir()
    rows, truth = ["path,labels,age"], {}
    for i, x in enumerate(breast["train_images"][:80]):
        found = [n for n in names if rng.random() < 0.35]
        image = x.copy()
        for n in found:
            j = names.index(n)
            image[2:8, 2 + 8 * j:8 + 8 * j] = 255
        Image.fromarray(image).save(root / f"{i}.png")
        rows.append(f"{i}.png,{'|'.join(reversed(found)) if found else 'No Finding'},{40 + i % 30}")
        truth[f"{i}.png"] = [int(n in found) for n in names]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    dataset = folder(root / "labels.csv", tmp_path / "cache")
    check_dataset(dataset)
    assert dataset.task == "multi-label" and dataset.class_names == names
    record = dataset.split_record.read_text().splitlines()
    assert record[0] == "path,labels,split"
    by_split = {"train": [], "val": [], "test": []}
    for line in record[1:]:
        name, labels, split = line.split(",")
        by_split[split].append(truth[name])
        assert labels == "|".join(n for n, t in zip(names, truth[name]) if t)  # sorted, "" for No Finding
    for split, expected in by_split.items():
        assert np.array_equal(dataset.split(split).labels, np.asarray(expected).reshape(-1, 3))
    shutil.copy(dataset.split_record, root / "split.csv")  # the recorded split, given back as the manifest, pins it
    pinned = folder(root / "split.csv", tmp_path / "cache")
    assert pinned.task == "multi-label" and all(
        np.array_equal(pinned.split(s).labels, dataset.split(s).labels) for s in ("train", "val", "test"))
    code, _, err = invoke("-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets",
                          f"folder:root={root / 'labels.csv'}", "--methods", "prototype", "--shots", "1,2",
                          "--seeds", "0", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "o", "--no-report")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert {r["status"] for r in records} == {"ok"} and all(r["multilabel"]["labels"] == names for r in records)
