"""Image corruptions on the test split (the robustness track): MedMNIST-C's definitions, reproduced.

MedMNIST-C (Di Salvo et al., 2024; PyPI ``medmnistc`` 0.1.0) defines, per MedMNIST dataset, the corruptions its
modality suffers and five severities of each (``medmnistc/corruptions/registry.py``), on 224 px images. The package
cannot be installed beside our stack: it pins ``scikit-image==0.23.2`` and ``medmnist==3.0.1`` and needs ImageMagick
through ``wand`` for motion blur. So its definitions are reproduced here with the libraries it uses itself where they
install (Pillow, torchvision, scikit-image, numpy), one function each, with its parameters in :data:`SETS`:

- ``pixelate`` (factor f): Pillow box resize to ``int(224 f)`` and back (box).
- ``jpeg_compression`` (quality q): a Pillow JPEG round trip at quality q.
- ``gaussian_noise`` (σ): ``clip(x + N(0, σ))``, x in [0, 1].
- ``speckle_noise`` (σ): ``clip(x + x · N(0, σ))``.
- ``impulse_noise`` (amount a): scikit-image ``random_noise(mode="s&p", amount=a)``.
- ``shot_noise`` (λ): ``clip(Poisson(x λ) / λ)``.
- ``gaussian_blur`` (kernel k): torchvision ``gaussian_blur(kernel_size=k)`` (its default σ for k).
- ``motion_blur`` (radius r, σ): ImageMagick's ``MotionBlurImage`` (MagickCore/effect.c), which medmnistc calls
  through ``wand``, re-implemented: a one-sided line kernel of ``2⌈r⌉+1`` taps weighted ``exp(-i²/2σ²)``
  (normalised), the taps' offsets rounded along an angle drawn uniformly from [-45°, 45°] per image, image edges
  replicated (ImageMagick's default virtual pixels). The only corruption not computed by the library medmnistc uses.
- ``brightness_up``/``_down``, ``contrast_up``/``_down`` (factor): Pillow ``ImageEnhance.Brightness``/``Contrast``.
- ``gamma_corr_up``/``_down`` (γ): torchvision ``adjust_gamma(gamma=γ, gain=1)``.

Float results become uint8 by truncation (``(x · 255).astype(uint8)``), as in medmnistc.

**Resolution.** MedMNIST-C's parameters are for 224 px images (a 5 px motion blur or a 13-tap Gaussian would erase a
28 px image), so each test image is first resized to 224 px with the harness's own preprocessing resize (bicubic,
antialiased, :func:`hica_bench.data.preprocess`), corrupted there, and handed to the encoder at 224 px; the encoder's
input resize then changes nothing for a 224 px encoder. Clean cells keep the original images: the same resize happens
inside preprocessing, so the only difference a corruption-free path would add is the rounding to uint8 (the tests
check that features of such a path match the clean ones).

**Determinism.** Each image's random draws (noise, the motion angle) come from a generator seeded by (image index,
corruption, severity): the same corrupted image in every run and process, whatever the batch.

**Sets.** A dataset MedMNIST-C defines (by its dataset plugin's name, e.g. ``breastmnist``) gets that set with its
parameters.
Any other dataset (own-data folders, grey or RGB) gets the ``generic`` set: ChestMNIST's 13 corruptions and parameters,
MedMNIST-C's broadest set, with every operation applied per channel on RGB images.

**Balanced error.** MedMNIST-C scores a corruption by its balanced error (1 − balanced accuracy) averaged over the five
severities, normalised by AlexNet's (``BE``), and relative to the clean error (``rBE`` = (E − E_clean) / (E_AlexNet −
E_AlexNet,clean)); :data:`ALEXNET` holds its published AlexNet errors (``medmnistc/utils/baselines.py``) for the
datasets here.
"""

from __future__ import annotations

import difflib
import io
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from hica_bench.errors import UserError
from hica_bench.interfaces import Split

SIZE = 224  #: the side MedMNIST-C's parameters are defined at
SEVERITIES = (1, 2, 3, 4, 5)
#: changes whenever a definition below changes: part of every corrupted split's identity (feature-cache key, cell id)
VERSION = "medmnist-c-0.1.0-params/hica-bench-1"


# --------------------------------------------------------------------------- the operations (uint8 in, uint8 out)


def _pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(image)


def _unit(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def pixelate(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    img = _pil(image)
    w, h = img.size
    small = img.resize((int(w * factor), int(h * factor)), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BOX))


def jpeg_compression(image: np.ndarray, quality: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    _pil(image).save(buffer, "JPEG", quality=int(quality))
    buffer.seek(0)
    return np.asarray(Image.open(buffer))


def gaussian_noise(image: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    x = _unit(image)
    return _to_uint8(x + rng.normal(size=x.shape, scale=scale))


def speckle_noise(image: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    x = _unit(image)
    return _to_uint8(x + x * rng.normal(size=x.shape, scale=scale))


def impulse_noise(image: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    from skimage.util import random_noise

    return _to_uint8(random_noise(_unit(image), mode="s&p", amount=amount, rng=rng))


def shot_noise(image: np.ndarray, lam: float, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(rng.poisson(_unit(image) * lam) / lam)


def gaussian_blur(image: np.ndarray, kernel: int, rng: np.random.Generator) -> np.ndarray:
    import torchvision.transforms.functional as TF

    return np.asarray(TF.gaussian_blur(_pil(image), kernel_size=int(kernel))).astype(np.uint8)


def motion_blur(image: np.ndarray, radius_sigma: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    radius, sigma = radius_sigma
    angle = np.deg2rad(rng.uniform(-45, 45))
    width = int(2 * np.ceil(radius) + 1)
    taps = np.arange(width, dtype=np.float64)
    kernel = np.exp(-(taps ** 2) / (2 * sigma * sigma))
    kernel /= kernel.sum()
    px, py = width * np.sin(angle), width * np.cos(angle)
    norm = np.hypot(px, py)
    dx = np.ceil(taps * py / norm - 0.5).astype(int)  # ImageMagick's offset[i].x (columns)
    dy = np.ceil(taps * px / norm - 0.5).astype(int)  # offset[i].y (rows)
    x = image.astype(np.float64)
    h, w = x.shape[:2]
    rows, cols = np.arange(h), np.arange(w)
    out = np.zeros_like(x)
    for weight, ox, oy in zip(kernel, dx, dy):
        out += weight * x[np.clip(rows + oy, 0, h - 1)][:, np.clip(cols + ox, 0, w - 1)]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def brightness(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    from PIL import ImageEnhance

    return np.asarray(ImageEnhance.Brightness(_pil(image)).enhance(factor)).astype(np.uint8)


def contrast(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    from PIL import ImageEnhance

    return np.asarray(ImageEnhance.Contrast(_pil(image)).enhance(factor)).astype(np.uint8)


def gamma(image: np.ndarray, value: float, rng: np.random.Generator) -> np.ndarray:
    import torchvision.transforms.functional as TF

    return np.asarray(TF.adjust_gamma(_pil(image), value, gain=1)).astype(np.uint8)


OPERATIONS: dict[str, Callable[[np.ndarray, Any, np.random.Generator], np.ndarray]] = {
    "pixelate": pixelate, "jpeg_compression": jpeg_compression, "gaussian_noise": gaussian_noise,
    "speckle_noise": speckle_noise, "impulse_noise": impulse_noise, "shot_noise": shot_noise,
    "gaussian_blur": gaussian_blur, "motion_blur": motion_blur, "brightness_up": brightness,
    "brightness_down": brightness, "contrast_up": contrast, "contrast_down": contrast, "gamma_corr_up": gamma,
    "gamma_corr_down": gamma,
}

#: MedMNIST-C's corruptions and their five severities' parameters, per dataset (medmnistc 0.1.0, registry.py);
#: ``generic`` (ChestMNIST's) for every dataset it does not define
SETS: dict[str, dict[str, tuple]] = {
    "breastmnist": {
        "pixelate": (0.30, 0.25, 0.20, 0.15, 0.10),
        "jpeg_compression": (50, 30, 15, 10, 7),
        "speckle_noise": (0.10, 0.15, 0.20, 0.25, 0.30),
        "motion_blur": ((5, 5), (9, 7), (9, 10), (13, 10), (17, 12)),
        "brightness_up": (1.4, 1.5, 1.6, 1.8, 2.0),
        "brightness_down": (0.55, 0.5, 0.45, 0.4, 0.3),
        "contrast_down": (0.9, 0.8, 0.7, 0.6, 0.4),
    },
    "pneumoniamnist": {
        "pixelate": (0.8, 0.7, 0.6, 0.5, 0.40),
        "jpeg_compression": (50, 30, 15, 10, 7),
        "gaussian_noise": (0.04, 0.05, 0.06, 0.07, 0.08),
        "speckle_noise": (0.05, 0.07, 0.10, 0.15, 0.20),
        "impulse_noise": (0.005, 0.01, 0.013, 0.017, 0.02),
        "shot_noise": (300, 200, 150, 100, 80),
        "gaussian_blur": (3, 5, 7, 9, 11),
        "brightness_up": (1.1, 1.2, 1.3, 1.4, 1.5),
        "brightness_down": (0.9, 0.8, 0.7, 0.6, 0.5),
        "contrast_up": (1.1, 1.2, 1.3, 1.4, 1.6),
        "contrast_down": (0.9, 0.8, 0.7, 0.6, 0.4),
        "gamma_corr_up": (1.1, 1.2, 1.3, 1.4, 1.6),
        "gamma_corr_down": (0.9, 0.8, 0.7, 0.6, 0.4),
    },
    "generic": {  # ChestMNIST's
        "pixelate": (0.30, 0.25, 0.20, 0.15, 0.10),
        "jpeg_compression": (50, 30, 15, 10, 7),
        "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),
        "speckle_noise": (0.05, 0.15, 0.2, 0.35, 0.45),
        "impulse_noise": (0.01, 0.03, 0.06, 0.09, 0.17),
        "shot_noise": (60, 25, 18, 10, 5),
        "gaussian_blur": (3, 5, 7, 9, 11),
        "brightness_up": (1.1, 1.2, 1.3, 1.4, 1.5),
        "brightness_down": (0.9, 0.8, 0.7, 0.6, 0.5),
        "contrast_up": (1.1, 1.2, 1.3, 1.4, 1.6),
        "contrast_down": (0.9, 0.8, 0.7, 0.6, 0.4),
        "gamma_corr_up": (1.1, 1.2, 1.3, 1.4, 1.6),
        "gamma_corr_down": (0.9, 0.8, 0.7, 0.6, 0.4),
    },
}

#: AlexNet's balanced errors in MedMNIST-C (clean, and each corruption's mean over its severities), the BE/rBE
#: normalisers (medmnistc 0.1.0, utils/baselines.py)
ALEXNET: dict[str, dict[str, float]] = {
    "breastmnist": {
        "clean": 0.14536340852130336, "pixelate": 0.46127819548872184, "jpeg_compression": 0.2986215538847118,
        "speckle_noise": 0.38709273182957393, "motion_blur": 0.25902255639097743,
        "brightness_up": 0.3197994987468672, "brightness_down": 0.21127819548872181,
        "contrast_down": 0.15864661654135334,
    },
    "pneumoniamnist": {
        "clean": 0.10085470085470083, "pixelate": 0.22102564102564104, "jpeg_compression": 0.2798290598290598,
        "gaussian_noise": 0.4414529914529915, "speckle_noise": 0.3457264957264957,
        "impulse_noise": 0.4581196581196581, "shot_noise": 0.4106837606837607, "gaussian_blur": 0.2730769230769231,
        "brightness_up": 0.14649572649572645, "brightness_down": 0.2782051282051282,
        "contrast_up": 0.09529914529914527, "contrast_down": 0.23743589743589744,
        "gamma_corr_up": 0.09606837606837607, "gamma_corr_down": 0.16641025641025642,
    },
}


def set_name(dataset_name: str) -> str:
    """Which corruption set a dataset gets: its own MedMNIST-C set, else ``generic``."""
    return dataset_name if dataset_name in SETS else "generic"


def corruptions_for(dataset_name: str) -> dict[str, tuple]:
    return SETS[set_name(dataset_name)]


def check(dataset_label: str, dataset_name: str, corruption: str, severity: int) -> None:
    """One-line :class:`UserError` for a corruption this dataset's set does not define or a severity outside 1-5."""
    known = corruptions_for(dataset_name)
    if corruption not in known:
        where = (f"MedMNIST-C's {dataset_name} set" if set_name(dataset_name) == dataset_name
                 else "the generic set (ChestMNIST's)")
        close = difflib.get_close_matches(corruption, list(known), n=2) or difflib.get_close_matches(
            corruption, list(OPERATIONS), n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        defined = "" if corruption in OPERATIONS else "unknown corruption; "
        raise UserError(f"{dataset_label}: corruption {corruption!r} is not in {where} ({defined}defined there: "
                        f"{', '.join(known)}){hint}")
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise UserError(f"{dataset_label}: severity must be 1 to 5, got {severity!r}")


def parameter(dataset_name: str, corruption: str, severity: int) -> Any:
    return corruptions_for(dataset_name)[corruption][severity - 1]


def _code(corruption: str) -> int:
    return zlib.crc32(corruption.encode())


def to_size(images: np.ndarray, side: int = SIZE) -> np.ndarray:
    """uint8 (n, H, W[, 3]) -> uint8 (n, side, side[, 3]) with the preprocessing resize (bicubic, antialiased),
    rounded; unchanged when already ``side`` px."""
    import torch
    import torch.nn.functional as F

    images = np.asarray(images)
    if images.shape[1] == side and images.shape[2] == side:
        return images
    batch = torch.from_numpy(np.array(images, dtype=np.float32))
    batch = batch.unsqueeze(1) if batch.ndim == 3 else batch.permute(0, 3, 1, 2)
    batch = F.interpolate(batch, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    batch = batch.clamp_(0.0, 255.0).round_().to(torch.uint8)
    batch = batch[:, 0] if images.ndim == 3 else batch.permute(0, 2, 3, 1)
    return batch.contiguous().numpy()


def corrupt(images: np.ndarray, indices: np.ndarray, operation: Callable, value: Any, corruption: str,
            severity: int) -> np.ndarray:
    """Each image (its index in the split in ``indices``) at :data:`SIZE` px, corrupted with its own generator."""
    resized = to_size(images)
    out = np.empty_like(resized)
    for row, (image, index) in enumerate(zip(resized, indices)):
        rng = np.random.default_rng([int(index), _code(corruption), int(severity)])
        out[row] = operation(image, value, rng)
    return out


class CorruptedImages:
    """A lazy view of a split's images, each corrupted when read: slice it (``images[a:b]``) as the extraction does;
    nothing is held but the base images (memory stays flat whatever the split's size)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, base: np.ndarray, operation: Callable, value: Any, corruption: str, severity: int) -> None:
        self.base, self.operation, self.value = base, operation, value
        self.corruption, self.severity = corruption, severity

    def __len__(self) -> int:
        return len(self.base)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.base), SIZE, SIZE, *self.base.shape[3:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, item) -> np.ndarray:
        if isinstance(item, (int, np.integer)):
            return self[int(item): int(item) + 1 if item != -1 else None][0]
        if not isinstance(item, slice):
            indices = np.arange(len(self))[item]
            return corrupt(np.asarray(self.base[indices]), indices, self.operation, self.value, self.corruption,
                           self.severity)
        indices = np.arange(len(self))[item]
        return corrupt(np.asarray(self.base[item]), indices, self.operation, self.value, self.corruption,
                       self.severity)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


@dataclass
class CorruptedDataset:
    """A dataset whose **test** split is corrupted (``corruption`` at ``severity``); train and val are the base's own
    splits, so supports stay clean and their cached features are the clean dataset's (:meth:`CorruptedDataset.split_identity`)."""

    base: Any
    corruption: str
    severity: int
    plugin: str  #: the dataset plugin's name, which picks the corruption set (as the command line was checked)

    def __post_init__(self) -> None:
        self.name, self.size, self.task = self.base.name, self.base.size, self.base.task
        self.class_names = self.base.class_names
        self.set = set_name(self.plugin)
        self.value = parameter(self.plugin, self.corruption, self.severity)
        self.identity = f"{self.base.identity}|test:{self.corruption}@{self.severity}|{self.set}|{VERSION}"

    def split(self, name: str) -> Split:
        split = self.base.split(name)
        if name != "test":
            return split
        if split.images.ndim not in (3, 4) or (split.images.ndim == 4 and split.images.shape[-1] != 3):
            raise UserError(f"{self.base.name}: image corruptions take 2D grey or RGB images, not shape "
                            f"{tuple(split.images.shape[1:])}")
        return Split(CorruptedImages(split.images, OPERATIONS[self.corruption], self.value, self.corruption,
                                     self.severity), split.labels)

    def split_identity(self, name: str) -> str:
        """The identity of one split's content: the base's for train and val, this dataset's for test."""
        return self.identity if name == "test" else self.base.identity

    def describe(self) -> dict[str, Any]:
        """What a result records about the corruption (part of its origin, so of the cell's identity)."""
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return {"name": self.corruption, "severity": self.severity, "parameter": value, "set": self.set,
                "definitions": VERSION}


def variants(choices: list, names: list[str] | None, severities: list[int] | None) -> list:
    """The grid's datasets for ``--corruptions``/``--severities``: each clean dataset choice, followed by one choice per
    corruption (``all``: its set's every one) and severity (default 1-5). A name or severity a dataset's set does not
    define is one line (:func:`check`)."""
    import dataclasses

    if names is None:
        if severities is not None:
            raise UserError("--severities needs --corruptions (all, or a comma list of corruption names)")
        return list(choices)
    levels = list(severities) if severities is not None else list(SEVERITIES)
    out = []
    for choice in choices:
        out.append(choice)
        if choice.corruption is not None:  # given as DATASET:corruption=...: already one variant
            continue
        chosen = list(corruptions_for(choice.name)) if names == ["all"] else names
        for name in chosen:
            for level in levels:
                check(choice.label, choice.name, name, level)
                out.append(dataclasses.replace(choice, corruption=(name, level)))
    return out


def clean_origin_id(origin: Any) -> str:
    """The id ``origin`` has with its test split clean: a corrupted cell and the clean cell it is compared with share it."""
    import dataclasses

    if origin.corruption is None:
        return origin.id
    identity = origin.dataset_identity.split("|test:")[0]
    return dataclasses.replace(origin, corruption=None, dataset_identity=identity).id


#: rBE's denominator is AlexNet's excess balanced error on a corruption over its clean error. Where it is at most this
#: floor (AlexNet barely hurt, or helped: PneumoniaMNIST's contrast_up -0.0056 and gamma_corr_up -0.0048, BreastMNIST's
#: contrast_down 0.0133), the ratio flips sign or explodes (an excess of 0.057 over 0.0133 is a term of 4.3), so that
#: corruption's term is left out of rBE and named (``rbe_left_out``). 0.02 = two points of balanced error.
RBE_FLOOR = 0.02


def balanced_error_scores(dataset_name: str, clean_error: float, errors: dict[tuple[str, int], float]
                          ) -> tuple[float | None, float | None, list[str]]:
    """MedMNIST-C's BE and rBE (``medmnistc/eval.py``): per corruption, its balanced error averaged over the severities
    run, over AlexNet's (BE), and its excess over the clean error over AlexNet's excess (rBE); both averaged over the
    corruptions, rBE over those whose AlexNet excess is above :data:`RBE_FLOOR`; with the corruptions left out of rBE.
    (None, None, []) where MedMNIST-C published no AlexNet errors for the dataset. AlexNet's errors are MedMNIST-C's
    reference: AlexNet trained on the full training split at 224 px; a ratio compares with it, it does not rank
    against it."""
    terms = balanced_error_terms(dataset_name, clean_error, errors)
    if terms is None:
        return None, None, []
    rbe = [r for _, r in terms.values() if r is not None]
    return (float(np.mean([b for b, _ in terms.values()])), float(np.mean(rbe)) if rbe else None,
            [name for name, (_, r) in terms.items() if r is None])


def balanced_error_terms(dataset_name: str, clean_error: float, errors: dict[tuple[str, int], float]
                         ) -> dict[str, tuple[float, float | None]] | None:
    """Per corruption (sorted by name): its BE and rBE terms (rBE None where AlexNet's excess error is at most
    :data:`RBE_FLOOR`); None where MedMNIST-C published no AlexNet errors for the dataset."""
    alexnet = ALEXNET.get(dataset_name)
    if alexnet is None:
        return None
    by_corruption: dict[str, list[float]] = {}
    for (name, _), error in errors.items():
        by_corruption.setdefault(name, []).append(error)
    terms = {}
    for name, values in sorted(by_corruption.items()):
        mean = float(np.mean(values))
        excess = alexnet[name] - alexnet["clean"]
        terms[name] = (mean / alexnet[name], None if excess <= RBE_FLOOR else (mean - clean_error) / excess)
    return terms
