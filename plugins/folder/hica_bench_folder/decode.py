"""One image file -> a square uint8 array (grey (S, S) or RGB (S, S, 3)): the documented conversions.

- **PNG, JPEG, TIFF, BMP** through Pillow. 8-bit grey stays grey; RGB whose three channels are equal everywhere
  counts as grey; palette, CMYK and other colour modes become RGB; an alpha channel is dropped. **16-bit and 32-bit**
  (and float) images are scaled to uint8 by their own minimum and maximum (``(x - min) / (max - min) * 255``,
  rounded), since such files rarely use their whole range (12-bit X-rays in 16-bit PNGs). Multi-page TIFFs are refused.
- **DICOM** through pydicom: the modality LUT (``RescaleSlope``/``RescaleIntercept`` or a Modality LUT) first; then
  the VOI LUT or the first window (``WindowCenter``/``WindowWidth``, with its ``VOILUTFunction``) when the file has
  one, whose output range is mapped linearly to 0..255; otherwise the image's own minimum and maximum are. MONOCHROME1
  is inverted (``255 - x``) so that bright is dense on every image. Colour DICOM (``SamplesPerPixel`` 3) is read as
  RGB (pydicom converts YBR). Compressed transfer syntaxes decode through the plugins pydicom uses (RLE natively,
  JPEG baseline and JPEG 2000 through Pillow (with its OpenJPEG), JPEG-LS and lossless JPEG through pylibjpeg or GDCM:
  ``pip install hica-bench-folder[dicom-jpeg]``). ``PALETTE COLOR`` images go through their colour table to RGB. A
  data set without the 128-byte preamble is read when it parses as DICOM (it names its SOP class, modality, study or
  rows); one that starts after up to 3 stray bytes (pydicom's ``no_meta.dcm``) is read from its first element with a
  warning (:class:`StrayBytes`). A window that maps a whole
  image to one grey level (a CT window far from the slice's values) gives a blank image and a warning (:class:`FlatWindow`);
  the dataset option ``window=min-max`` scales every DICOM image by its own minimum and maximum instead of its window.
  Multi-frame files are refused (volumes are another dataset kind).
- **Resize** to the dataset's ``size`` when the image is not already ``size`` x ``size``: ``crop`` (default, as
  MedMNIST did for its chest X-rays) takes the centred square on the shorter side; ``pad`` pads the shorter side with
  black to a centred square; ``stretch`` ignores the aspect ratio. Then Pillow's bicubic filter (antialiased: its
  support widens with the reduction). An image already at ``size`` is never resampled, so lossless files give back
  their pixels bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hica_bench_folder.layout import PILLOW_SUFFIXES

RESIZE = ("crop", "pad", "stretch")
MAX_SQUARE = 1 << 28  #: pixels of the centred square an image is cropped or padded to before resizing (16,384²)


class BadImage(Exception):
    """The file is not a readable image of a kind we take; the message says why (the caller names the file)."""


def decode(path: Path, size: int, resize: str = "crop", window: str = "file") -> np.ndarray:
    """``path`` as uint8 (size, size) grey or (size, size, 3) RGB (see the module docstring); a file that cannot be
    decoded, for whatever reason its decoder gives, is a :class:`BadImage`. ``window``: a DICOM image's grey levels
    by its own window or VOI LUT (``file``) or by its own minimum and maximum (``min-max``)."""
    try:
        pixels = _pillow(path) if path.suffix.lower() in PILLOW_SUFFIXES else dicom(path, window)
    except BadImage:
        raise
    except Exception as exc:  # a decoder's own error (a DICOM window of width 0, an odd LUT, a codec bug)
        raise BadImage(f"cannot be decoded ({type(exc).__name__}: {_short(exc)})") from None
    if pixels.ndim == 3 and (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all():
        pixels = pixels[..., 0]  # grey saved as RGB
    height, width = pixels.shape[:2]
    side = max(height, width) if resize == "pad" else min(height, width) if resize == "crop" else 0
    if side * side > MAX_SQUARE:  # checked before anything that large is allocated
        raise BadImage(f"is {height:,} x {width:,} pixels: its {resize} square would be {side:,}² pixels, more than "
                       f"{MAX_SQUARE:,}; resize it first or use resize=stretch")
    return square(np.ascontiguousarray(pixels), size, resize)


def to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``values`` in [low, high] mapped linearly to 0..255, rounded to the nearest integer (all zero when flat)."""
    values = np.asarray(values, dtype=np.float64)
    if not high > low:
        return np.zeros(values.shape, np.uint8)
    return np.clip(np.rint((values - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)


def _min_max(values: np.ndarray) -> np.ndarray:
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        raise BadImage("holds NaN or infinite pixel values (its minimum and maximum, which scale it, are undefined)")
    return to_uint8(values, float(values.min()), float(values.max()))


def _pillow(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1:
                raise BadImage(f"has {image.n_frames} pages or frames; give one image per file")
            image.load()  # a truncated or damaged file fails here (Pillow does not load truncated images by default)
            mode = image.mode
            if mode in ("L", "RGB"):
                return np.asarray(image)
            if mode == "1":
                return np.asarray(image.convert("L"))
            if mode == "LA":
                return np.asarray(image.getchannel("L"))
            if mode.startswith("I") or mode == "F":  # 16-bit, 32-bit integer, float
                return _min_max(np.asarray(image))
            return np.asarray(image.convert("RGB"))  # palette, RGBA, CMYK, YCbCr, LAB, HSV
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("is not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated data, a broken chunk or header
        raise BadImage(f"is truncated or corrupt ({' '.join(str(exc).split()) or type(exc).__name__})") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"is too large to decode safely ({exc})") from None


class FlatWindow(UserWarning):
    """A DICOM file's window maps every pixel of its image to one grey level (a CT window far from the slice's
    values): the image is blank. ``window=min-max`` scales it by its own range instead."""


class StrayBytes(UserWarning):
    """A DICOM data set without preamble that starts after a few stray bytes (pydicom's ``no_meta.dcm`` has one before
    its first element): read from its first element, and said once per dataset, since the file is damaged."""


def _noting(kind: type[UserWarning], path: Path, text: str) -> UserWarning:
    """A decoding warning about ``path`` that keeps the path (``.path``) for the dataset's one summary line."""
    warning = kind(f"{path}: {text}")
    warning.path = str(path)
    return warning


MAX_STRAY_BYTES = 3  #: how many leading bytes a bare data set may have before its first element and still be read


def _read_dicom(path: Path):
    """The data set of ``path``: a DICOM file with its 128-byte preamble and ``DICM``, or a bare data set without them
    (older files, pydicom's ``no_meta.dcm``) when it parses as one with an image; else a :class:`BadImage`."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    neither = "is neither an image Pillow reads (PNG, JPEG, TIFF, BMP) nor a DICOM file"
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass
    except Exception as exc:  # a truncated or malformed data set
        raise BadImage(f"is a truncated or corrupt DICOM file ({type(exc).__name__}: {_short(exc)})") from None
    try:  # no preamble: a bare data set, taken as DICOM when it parses as one (it names what it is)
        ds = pydicom.dcmread(path, force=True)
        if not _names_itself(ds):
            ds = _after_stray_bytes(path)
        if ds is None:
            raise BadImage(neither)
        if "TransferSyntaxUID" not in ds.file_meta:  # the encoding it was read with says how its pixels are stored
            from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

            implicit, little = ds.original_encoding
            ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        return ds
    except BadImage:
        raise
    except Exception:
        raise BadImage(neither) from None


def _names_itself(ds) -> bool:
    return any(keyword in ds for keyword in ("SOPClassUID", "Modality", "StudyInstanceUID", "Rows"))


def _after_stray_bytes(path: Path):
    """The bare data set that starts 1 to :data:`MAX_STRAY_BYTES` bytes into ``path`` with a group 0008 element (where
    every image's data set starts), read and warned about (:class:`StrayBytes`); None when there is none."""
    import io
    import warnings

    import pydicom

    with path.open("rb") as handle:
        data = handle.read()
    for skip in range(1, MAX_STRAY_BYTES + 1):
        if data[skip:skip + 2] != b"\x08\x00":  # little-endian group 0008: the only start this rescues
            continue
        try:
            ds = pydicom.dcmread(io.BytesIO(data[skip:]), force=True)
        except Exception:
            continue
        if _names_itself(ds) and "PixelData" in ds:
            warnings.warn(_noting(StrayBytes, path, f"{skip} stray byte(s) before its first DICOM element were skipped"),
                          stacklevel=2)
            return ds
    return None


def dicom(path: Path, window: str = "file") -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    ds = _read_dicom(path)
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise BadImage("is a DICOM file without pixel data (no PixelData element)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise BadImage(f"is a multi-frame DICOM ({frames} frames); give one image per file")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # no decoder for its transfer syntax, or damaged pixel data
        syntax = ds.file_meta.get("TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
        if not decoder_available(syntax):
            raise BadImage(f"uses the transfer syntax {getattr(syntax, 'name', syntax)}, which needs a decoder pydicom "
                           "does not have here: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or "
                           "python-gdcm)") from None
        raise BadImage(f"has pixel data its {getattr(syntax, 'name', syntax)} decoder cannot read "
                       f"({type(exc).__name__}: {_short(exc)})") from None
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric == "PALETTE COLOR":  # the stored values are indices into the file's colour table
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return to_uint8(apply_color_lut(pixels, ds), 0, 2**bits - 1)
    if int(ds.get("SamplesPerPixel", 1)) == 3:  # colour, already RGB (pydicom converts YBR)
        return pixels if pixels.dtype == np.uint8 else _min_max(pixels)
    values = apply_modality_lut(pixels, ds)
    if window == "file" and ("VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)):
        low, high = _voi_range(ds)
        grey = to_uint8(apply_voi_lut(values, ds, index=0), low, high)
        if grey.min() == grey.max() and np.ptp(values) > 0:
            import warnings

            warnings.warn(_noting(FlatWindow, path, "its window maps the whole image to one grey level; window=min-max "
                                  "scales such files by their own range"), stacklevel=2)
    else:
        grey = _min_max(values)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return grey


def decoder_available(syntax) -> bool:
    """Whether pydicom has a working decoder here for the transfer syntax ``syntax`` (JPEG 2000 through Pillow's
    OpenJPEG, for one): a decode that fails with one is damaged data, not a missing package."""
    try:
        from pydicom.pixels import get_decoder

        return syntax is not None and get_decoder(syntax).is_available
    except Exception:
        return False


def _voi_range(ds) -> tuple[float, float]:
    """The output range of the VOI transform pydicom's ``apply_voi_lut`` applies (PS3.3 C.11.2): a VOI LUT's
    ``[0, 2**bits - 1]``; a window's range of the stored values after the modality transform."""
    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    low, high = (0, 2**bits - 1) if int(ds.get("PixelRepresentation", 0)) == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope", None), ds.get("RescaleIntercept", None)
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return float(low), float(high)


def square(pixels: np.ndarray, size: int, resize: str) -> np.ndarray:
    """``pixels`` (H, W[, 3]) as (size, size[, 3]) per ``resize`` (see the module docstring)."""
    height, width = pixels.shape[:2]
    if (height, width) == (size, size):
        return pixels
    from PIL import Image

    if resize == "crop" and height != width:
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        pixels = pixels[top:top + side, left:left + side]
    elif resize == "pad" and height != width:
        side = max(height, width)
        padded = np.zeros((side, side, *pixels.shape[2:]), np.uint8)
        top, left = (side - height) // 2, (side - width) // 2
        padded[top:top + height, left:left + width] = pixels
        pixels = padded
    return np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize((size, size), Image.Resampling.BICUBIC))


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
