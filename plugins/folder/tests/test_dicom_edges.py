"""Real DICOM edge cases (issue 31, class 6), on the files pydicom ships (``pydicom/data/test_files``: real files from
scanners and toolkits, read where pydicom installed them, never copied here): PALETTE COLOR through its colour table,
data sets without the 128-byte preamble, JPEG 2000 through Pillow's OpenJPEG (a failure there is damaged data, not a
missing package), a window that blanks a whole CT slice (warned once; ``window=min-max`` instead), and pydicom's own
log records and warnings kept off stderr."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_color_lut

from conftest import TEST_PLUGINS, invoke
from hica_bench_folder import decode

FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _file(name: str) -> Path:
    path = FILES / name
    if not path.is_file():
        pytest.skip(f"pydicom {pydicom.__version__} does not ship {name}")
    return path


def test_palette_colour_goes_through_its_colour_table():
    path = _file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    expected = decode.to_uint8(apply_color_lut(ds.pixel_array, ds), 0, 2**bits - 1)
    rgb = decode.dicom(path)
    assert rgb.shape == (*ds.pixel_array.shape, 3) and np.array_equal(rgb, expected)
    assert not np.array_equal(rgb[..., 0], ds.pixel_array.astype(np.uint8))  # not the grey indices


@pytest.mark.parametrize("name", ["ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"])
def test_a_data_set_without_its_preamble_is_read_as_dicom(name):
    """pydicom's header-only data sets without preamble and meta: read as DICOM (little and big endian), so the line
    says what is wrong with them (no pixel data) instead of "not DICOM"."""
    with pytest.raises(decode.BadImage, match="is a DICOM file without pixel data"):
        decode.dicom(_file(name))


def test_a_ct_without_its_preamble_is_decoded(tmp_path):
    """CT_small's data set written without preamble and File Meta Information (as ``no_meta.dcm`` is described; the
    copy pydicom 3.0.2 ships starts with a stray byte its own force reader misreads): decoded, as with its header."""
    ds = pydicom.dcmread(_file("CT_small.dcm"))
    bare = tmp_path / "bare.dcm"
    del ds.file_meta  # no File Meta Information; written without preamble in its own (explicit little) encoding
    ds.preamble = None
    pydicom.dcmwrite(bare, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    data = bare.read_bytes()
    if data[128:132] == b"DICM":  # some pydicom versions still write the header: strip it
        pytest.skip("this pydicom writes the preamble")
    assert np.array_equal(decode.dicom(bare), decode.dicom(_file("CT_small.dcm")))


def test_pydiccoms_no_meta_ct_is_read_past_its_stray_byte():
    """The ``no_meta.dcm`` pydicom ships: a real CT data set without preamble and meta, after one stray byte (0x20) that
    pydicom's own ``force`` reader misreads as an element. Read from its first element, with a warning, it is
    CT_small's image pixel for pixel."""
    path = _file("no_meta.dcm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = decode.dicom(path)
    assert np.array_equal(image, decode.dicom(_file("CT_small.dcm")))
    assert [w.message.path for w in caught if w.category is decode.StrayBytes] == [str(path)]


@pytest.mark.parametrize("prefix", [b"\x00" * (decode.MAX_STRAY_BYTES + 1), b"junk junk"])
def test_more_stray_bytes_or_a_bare_data_set_without_an_image_are_refused(tmp_path, prefix):
    """Past :data:`decode.MAX_STRAY_BYTES`, or after bytes that are not followed by a group 0008 element with pixel
    data, a file is not taken for DICOM: a damaged file is refused, not guessed at."""
    data = _file("no_meta.dcm").read_bytes()[1:]
    path = tmp_path / "shifted.dcm"
    path.write_bytes(prefix + data)
    with pytest.raises(decode.BadImage, match="neither an image Pillow reads"):
        decode.dicom(path)
    header_only = tmp_path / "header.dcm"
    header_only.write_bytes(b" " + _file("ExplVR_LitEndNoMeta.dcm").read_bytes())
    with pytest.raises(decode.BadImage, match="neither an image Pillow reads"):
        decode.dicom(header_only)


def test_a_file_that_is_no_dicom_at_all_is_still_refused(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_bytes(b"meeting notes, not an image\n" * 20)
    with pytest.raises(decode.BadImage, match="neither an image Pillow reads"):
        decode.dicom(path)


@pytest.mark.parametrize("name", ["693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"])
def test_jpeg_2000_decodes_through_pillow(name):
    path = _file(name)
    assert decode.decoder_available(pydicom.dcmread(path).file_meta.TransferSyntaxUID)
    assert decode.dicom(path).dtype == np.uint8


def test_a_jpeg_2000_file_its_decoder_cannot_read_is_not_blamed_on_a_missing_package():
    path = _file("GDCMJ2K_TextGBR.dcm")
    try:
        decode.dicom(path)
    except decode.BadImage as exc:
        assert "needs a decoder" not in str(exc) and "decoder cannot read" in str(exc)


def _blank_ct(tmp_path: Path) -> Path:
    """CT_small (signed CT, stored values with rescale) with a window far below its values."""
    ds = pydicom.dcmread(_file("CT_small.dcm"))
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ds.WindowCenter, ds.WindowWidth = float(values.min()) - 2000, 100
    path = tmp_path / "blank.dcm"
    ds.save_as(path)
    return path


def test_a_window_that_blanks_the_slice_warns_and_min_max_reads_it(tmp_path):
    path = _blank_ct(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        blank = decode.dicom(path)
    assert blank.min() == blank.max() and any(issubclass(w.category, decode.FlatWindow) for w in caught)
    scaled = decode.dicom(path, window="min-max")
    assert scaled.min() == 0 and scaled.max() == 255


def test_the_folder_dataset_warns_once_and_keeps_pydiccoms_messages_off_stderr(tmp_path, medmnist_root, monkeypatch):
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))
    root = tmp_path / "data"
    for label, source in (("a", "CT_small.dcm"), ("b", "MR_small.dcm")):
        (root / label).mkdir(parents=True)
        for i in range(5):
            shutil.copy(_file(source), root / label / f"{i}.dcm")
    blank = _blank_ct(tmp_path)
    for i in range(2):
        shutil.copy(blank, root / "a" / f"blank{i}.dcm")
    shutil.copy(_file("no_meta.dcm"), root / "a" / "no_meta.dcm")

    def noisy(*args, **kwargs):  # pydicom speaking while it reads: a log record and a warning
        logging.getLogger("pydicom").warning("a pydicom log record")
        warnings.warn("a pydicom warning", UserWarning)
        return original(*args, **kwargs)

    original = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", noisy)
    base = ["-p", "pixel_encoder", "run", "--encoder", "pixels", "--methods", "prototype", "--shots", "1", "--seeds",
            "0", "--data-root", medmnist_root, "--cache-dir", tmp_path / "cache"]
    code, out, err = invoke(*base, "--datasets", f"folder:root={root}", "--out", tmp_path / "o1")
    assert code == 0, err
    assert "pydicom" not in err  # neither its log records nor its warnings reach stderr
    assert err.count("window that maps the whole image to one grey level") == 1 and "2 DICOM files" in err
    assert err.count("start with stray bytes before their data set") == 1 and "no_meta.dcm" in err
    code, out, err = invoke(*base, "--datasets", f"folder:root={root}:window=min-max", "--out", tmp_path / "o2")
    assert code == 0 and "one grey level" not in err, err


SHIPPED = sorted(p.name for p in FILES.glob("*") if p.is_file() and p.suffix.lower() in ("", ".dcm"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_file_pydicom_ships_decodes_or_is_one_reason(name):
    """Each of pydicom's test files (scanners' and toolkits' real files, odd ones included) decodes to a uint8 image at
    28 px or is refused with one line of reason (a BadImage): never another exception. (pydicom's own messages are
    kept off stderr by the folder dataset while it decodes: the dataset test above.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = decode.decode(FILES / name, 28)
        except decode.BadImage as exc:
            assert str(exc) and "\n" not in str(exc) and len(str(exc)) < 400
        else:
            assert image.dtype == np.uint8 and image.shape[:2] == (28, 28)
