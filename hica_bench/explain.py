"""Explanations of one cell's predictions, and how faithful they are (``hica-bench explain``).

For one cell (dataset, method, encoder, k, seed: the support set, features and fitted method a run's cell has) and
chosen test images, each explained for the class the method predicts:

- ``occlusion`` (any method): captum's ``FeatureAblation`` over a GRID x GRID grid of patches of the image, through
  the method's own ``predict_proba``; a removed patch is replaced by the image's heavy Gaussian blur (sigma = side /
  8: the image's own intensities without its local structure, rather than an out-of-distribution black square), and
  the perturbed images are re-encoded by the run's extraction service in batches (a method that adapted the encoder:
  through its ``encoder_``). A patch's value is the drop of the predicted class's probability when it is removed.
- ``grad-cam`` (methods with a differentiable head, ``head_``: see :class:`hica_bench.interfaces.Method`):
  pytorch-grad-cam on the encoder's last spatial layer, found by tracing one forward: the last layer with a
  (N, C, h, w) map, or for a transformer the input of its last block (its patch tokens folded into a square;
  the last block's own patch tokens never reach the class token). The target is the method's logit of the predicted
  class, computed from the encoder's features by ``head_`` (per method: see each method's ``head_``).
- ``regions`` (methods offering ``regions_``, HiCA): the method's own ROI boxes for the image, each with the local
  descriptor it matches best and the cosine similarity.

Faithfulness (Petsiuk et al., RISE, 2018): for each map, the patches in order of decreasing attribution are removed
one by one (deletion: replaced by the blurred image) or added one by one to the blurred image (insertion), and the
predicted class's probability is read after each step. The area under each curve (fraction of patches on x, from 0
to 1) is its AUC: a faithful map has a low deletion AUC and a high insertion AUC. A random order of the patches
(seeded) is the reference every map must beat.

Everything is written under ``OUT/explanations/<cell>/``: ``explanation.json`` (the cell, per image the label,
prediction, probabilities, regions and AUCs, and the curves), ``<attribution>.npy`` (N, H, W) float32 maps in the
image's own pixels, ``images.npy`` and ``overlays.png``. When ``OUT`` holds a run's ``results.jsonl`` with this
cell finished, its recorded extraction settings are used (the run's very features, so the same cell identity), and
the run's report is written again with the explanations in it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hica_bench import plan, volumes
from hica_bench.cell import FEATURE_NEEDS, method_needs, prepare
from hica_bench.encoder_pairs import LazyEncoderPair, encoder_pair
from hica_bench.errors import NotApplicable, UserError
from hica_bench.extraction import FeatureExtractor
from hica_bench.extraction.tuning import ExtractionSettings
from hica_bench.registry import Registry, RunComponents
from hica_bench.results import ResultsStore, Status, jsonable
from hica_bench.explanations import GRID, SCHEMA
from hica_bench.files import atomic_write, digest, digests_remembered_in

ATTRIBUTIONS = ("occlusion", "grad-cam")


# --------------------------------------------------------------------------- the model as a function of images


class Predictor:
    """A fitted method as a function of raw uint8 images: encoded as the run encodes them (the extraction service's
    forward and batch size; a method's adapted ``encoder_`` eagerly, as the run encodes test images through it),
    then the method's ``predict_proba``."""

    def __init__(self, model: Any, pair: Any, extractor: Any) -> None:
        self.model, self.pair = model, pair
        adapted = getattr(model, "encoder_", None)
        self.encoder = adapted if adapted is not None else pair.image  #: the image encoder the method predicts with
        # an adapted encoder: the service's own view of it (made once, so its forward is reused by every batch)
        self.service = extractor if adapted is None else extractor.through(adapted)

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.service.encode(images)

    def proba(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_proba(self.features(images)), dtype=np.float64)


def blurred(image: np.ndarray) -> np.ndarray:
    """The reference an image's removed patches take: a Gaussian blur with sigma = side / 8 (per channel)."""
    from scipy.ndimage import gaussian_filter

    sigma = max(image.shape[0], image.shape[1]) / 8
    sigmas = (sigma, sigma) + ((0,) if image.ndim == 3 else ())
    return np.clip(np.rint(gaussian_filter(image.astype(np.float64), sigmas, mode="reflect")), 0, 255).astype(np.uint8)


def patch_ids(height: int, width: int, grid: int = GRID) -> np.ndarray:
    """(H, W) int64: the patch of each pixel on a grid x grid grid (row-major; edges split as evenly as possible)."""
    rows = np.minimum(np.arange(height) * grid // height, grid - 1)
    cols = np.minimum(np.arange(width) * grid // width, grid - 1)
    return rows[:, None] * grid + cols[None, :]


def patch_scores(attribution: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mean attribution per patch, (grid * grid,)."""
    count = np.bincount(ids.ravel(), minlength=ids.max() + 1)
    return np.bincount(ids.ravel(), weights=attribution.ravel(), minlength=ids.max() + 1) / np.maximum(count, 1)


def occlusion(predictor: Predictor, image: np.ndarray, target: int, batch: int = 32, grid: int = GRID) -> np.ndarray:
    """(H, W) float32: the drop of class ``target``'s probability when each patch is replaced by the blurred image
    (captum ``FeatureAblation``, ``perturbations_per_eval=batch``)."""
    import torch
    from captum.attr import FeatureAblation

    def forward(batch_images):
        images = batch_images.round().clamp(0, 255).to(torch.uint8).numpy()
        return torch.from_numpy(predictor.proba(images))

    ids = patch_ids(image.shape[0], image.shape[1], grid)
    mask = torch.from_numpy(ids if image.ndim == 2 else np.repeat(ids[..., None], image.shape[2], axis=2))[None]
    attribution = FeatureAblation(forward).attribute(
        torch.from_numpy(image.astype(np.float32))[None], baselines=torch.from_numpy(blurred(image).astype(np.float32))[None],
        target=int(target), feature_mask=mask, perturbations_per_eval=batch)[0].numpy()
    return (attribution if attribution.ndim == 2 else attribution.mean(axis=2)).astype(np.float32)


# --------------------------------------------------------------------------- Grad-CAM


def _module_of(encoder: Any, seen: set[int] | None = None) -> Any:
    """The torch module an image encoder runs (the encoder itself, or one held in ``model``/``base``/``module``)."""
    import torch

    if isinstance(encoder, torch.nn.Module):
        return encoder
    seen = seen or set()
    if id(encoder) in seen:
        return None
    seen.add(id(encoder))
    for name in ("model", "base", "module", "visual"):
        found = _module_of(getattr(encoder, name, None), seen) if getattr(encoder, name, None) is not None else None
        if found is not None:
            return found
    return None


def cam_layer(encoder: Any, x: Any) -> tuple[Any, Callable | None, str]:
    """(layer, reshape_transform, description) for Grad-CAM on ``encoder``, found by tracing one forward of ``x``
    (see the module docstring); a ValueError when the encoder has no spatial layer."""
    import torch

    module = _module_of(encoder)
    if module is None:
        raise ValueError("its image encoder exposes no torch module to trace")
    batch = x.shape[0]
    trace: list[tuple[str, Any, tuple[int, ...], Any]] = []
    parents = {id(child): parent for parent in module.modules() for child in parent.children()}
    hooks = [sub.register_forward_hook(lambda m, i, o, name=name: trace.append((name, m, tuple(o.shape), parents.get(id(m))))
                                       if isinstance(o, torch.Tensor) else None)
             for name, sub in module.named_modules() if name]
    try:
        with torch.no_grad():
            encoder.encode(x)
    finally:
        for hook in hooks:
            hook.remove()
    last_map = max((i for i, (_, _, shape, _) in enumerate(trace)
                    if len(shape) == 4 and shape[0] == batch and min(shape[2:]) >= 2), default=None)
    # a transformer's trunk: a ModuleList/Sequential whose children (2 or more) all output the same token tensor
    by_container: dict[int, list[int]] = {}
    for i, (_, m, shape, parent) in enumerate(trace):
        if isinstance(parent, (torch.nn.ModuleList, torch.nn.Sequential)):
            by_container.setdefault(id(parent), []).append(i)
    trunks = [members for members in by_container.values()
              if len(members) >= 2 and len({trace[i][2] for i in members}) == 1 and len(trace[members[0]][2]) == 3
              and batch in trace[members[0]][2][:2]
              and _square_tokens(trace[members[0]][2][1 if trace[members[0]][2][0] == batch else 0]) is not None]
    blocks = max(trunks, key=lambda members: members[-1]) if trunks else []
    if len(blocks) >= 2 and (last_map is None or blocks[-2] > last_map):
        name, _, shape, _ = trace[blocks[-2]]
        batch_first = shape[0] == batch
        tokens = shape[1] if batch_first else shape[0]
        side, prefix = _square_tokens(tokens)

        def fold(output):
            output = output if batch_first else output.transpose(0, 1)
            patches = output[:, prefix:]
            return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], side, side)

        return trace[blocks[-2]][1], fold, f"{name} (input of the last transformer block, {side}x{side} patch tokens)"
    if last_map is None:
        raise ValueError("its image encoder has no layer with a spatial map")
    name, layer, shape, _ = trace[last_map]
    return layer, None, f"{name} ({shape[1]} channels, {shape[2]}x{shape[3]})"


def _square_tokens(tokens: int) -> tuple[int, int] | None:
    """(side, prefix tokens) when ``tokens`` is a square grid plus 0-8 prefix tokens (class, registers)."""
    for prefix in (1, 0, 2, 4, 5, 8):
        side = int(round((tokens - prefix) ** 0.5)) if tokens > prefix else 0
        if side >= 2 and side * side == tokens - prefix:
            return side, prefix
    return None


def grad_cam(model: Any, encoder: Any, images: np.ndarray, targets: list[int], device: str) -> tuple[np.ndarray, str]:
    """((N, H, W) float32 maps in [0, 1] in the images' own pixels, the layer used): pytorch-grad-cam through the
    encoder and the method's ``head_``."""
    import torch
    import torch.nn.functional as F
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from hica_bench.data import preprocess

    head = getattr(model, "head_", None)
    if not callable(head):
        raise ValueError(f"{type(model).__name__} offers no differentiable head (head_)")

    class Scored(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = _module_of(encoder)  # registered: pytorch-grad-cam reads the device off its parameters

        def forward(self, x):
            return head(encoder.encode(x).float())

    x = preprocess(images, encoder.input_spec, device)
    layer, fold, where = cam_layer(encoder, x[:2])
    maps = []
    with GradCAM(model=Scored(), target_layers=[layer], reshape_transform=fold) as cam:
        for start in range(0, len(x), 8):
            part = x[start:start + 8].clone().requires_grad_(True)
            found = cam(input_tensor=part, targets=[ClassifierOutputTarget(int(t)) for t in targets[start:start + 8]])
            maps.append(np.asarray(found, dtype=np.float32))
    full = torch.from_numpy(np.concatenate(maps))[:, None]
    small = F.interpolate(full, size=images.shape[1:3], mode="area")[:, 0].numpy()
    return small.astype(np.float32), where


# --------------------------------------------------------------------------- faithfulness


def curves(predictor: Predictor, image: np.ndarray, attribution: np.ndarray | None, target: int, seed: int = 0,
           grid: int = GRID) -> dict[str, Any]:
    """Deletion and insertion curves of class ``target``'s probability for ``attribution``'s patch order (None: a
    random order drawn from ``seed``), with their AUCs (see the module docstring)."""
    ids = patch_ids(image.shape[0], image.shape[1], grid)
    patches = grid * grid
    if attribution is None:
        order = np.random.default_rng(seed).permutation(patches)
    else:
        order = np.argsort(-patch_scores(attribution, ids), kind="stable")
    reference = blurred(image)
    rank = np.empty(patches, dtype=np.int64)
    rank[order] = np.arange(patches)
    pixel_rank = rank[ids]
    steps = np.arange(patches + 1)
    chosen = pixel_rank[None] < steps[:, None, None]  # (steps, H, W): the patches moved after each step
    if image.ndim == 3:
        chosen = chosen[..., None]
    deleted = np.where(chosen, reference[None], image[None])
    inserted = np.where(chosen, image[None], reference[None])
    probabilities = predictor.proba(np.concatenate([deleted, inserted]))[:, target]
    deletion, insertion = probabilities[:len(steps)], probabilities[len(steps):]
    x = steps / patches
    return {"deletion": deletion.round(6).tolist(), "insertion": insertion.round(6).tolist(),
            "deletion_auc": float(np.trapezoid(deletion, x)), "insertion_auc": float(np.trapezoid(insertion, x))}


# --------------------------------------------------------------------------- one cell


@dataclass
class Explained:
    """What :func:`explain_images` found for the chosen test images."""

    indices: list[int]
    images: np.ndarray
    labels: np.ndarray
    proba: np.ndarray  #: (N, C) of the unperturbed images
    maps: dict[str, np.ndarray]  #: attribution -> (N, H, W)
    unavailable: dict[str, str]  #: attribution -> why it was not computed
    layer: str | None  #: Grad-CAM's layer
    regions: list[list[dict[str, Any]]] | None
    faithfulness: list[dict[str, dict[str, Any]]]  #: per image: attribution (and "random") -> curves

    @property
    def predicted(self) -> np.ndarray:
        return self.proba.argmax(axis=1)


def explain_images(model: Any, pair: Any, extractor: Any, images: np.ndarray, labels: np.ndarray,
                   indices: list[int], seed: int = 0) -> Explained:
    """Maps, regions and deletion/insertion curves for ``images`` (uint8, 2D) under a fitted ``model``."""
    predictor = Predictor(model, pair, extractor)
    proba = predictor.proba(images)
    predicted = proba.argmax(axis=1)
    maps, unavailable, layer = {}, {}, None
    maps["occlusion"] = np.stack([occlusion(predictor, image, int(t)) for image, t in zip(images, predicted)])
    try:
        maps["grad-cam"], layer = grad_cam(model, predictor.encoder, images, [int(t) for t in predicted], pair.device)
    except ValueError as exc:  # no head_, no spatial layer: the reason is the message
        unavailable["grad-cam"] = str(exc)
    except Exception as exc:  # a plugin's encoder or head_ that cannot be differentiated: said, not a traceback
        unavailable["grad-cam"] = f"it failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    regions = None
    if callable(getattr(model, "regions_", None)):
        regions = model.regions_(images)
    faithfulness = []
    for i, (image, target) in enumerate(zip(images, predicted)):
        per = {name: curves(predictor, image, found[i], int(target)) for name, found in maps.items()}
        per["random"] = curves(predictor, image, None, int(target), seed=seed + int(indices[i]))
        faithfulness.append(per)
    return Explained(list(map(int, indices)), images, labels, proba, maps, unavailable, layer, regions, faithfulness)


def summary_rows(faithfulness: list[dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per attribution (and the random order): mean ± standard error over the images of the deletion and insertion
    AUCs, and for each map its paired difference from the random order on the same images with the Wilcoxon
    signed-rank p (:func:`hica_bench.stats.paired_test`; images differ far more than maps do, so the paired
    difference is what says whether a map beats chance)."""
    from hica_bench import stats

    rows = []
    for name in faithfulness[0]:
        row: dict[str, Any] = {"attribution": name, "n": len(faithfulness)}
        for curve in ("deletion_auc", "insertion_auc"):
            values = np.array([f[name][curve] for f in faithfulness])
            row[curve] = float(values.mean())
            row[curve + "_se"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
            if name != "random":
                test = stats.paired_test({i: f[name][curve] for i, f in enumerate(faithfulness)},
                                         {i: f["random"][curve] for i, f in enumerate(faithfulness)})
                row[curve + "_vs_random"], row[curve + "_vs_random_p"] = test.difference, test.p
        rows.append(row)
    return rows


def folder_name(key: Any) -> str:
    """The explanation folder of a cell: dataset, size, method, encoder, k, seed (readable), plus a digest."""
    text = f"{key.dataset}-{key.size}-{key.method}-{key.encoder}-k{key.k}-seed{key.seed}"
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text)[:96] + "-" + digest([key.dataset, key.size, key.method, key.encoder,
                                                                        key.k, key.seed, key.max_test], 8)


def write(explained: Explained, folder: Path, cell: dict[str, Any], class_names: list[str]) -> Path:
    """``explained`` as files in ``folder`` (see the module docstring); returns ``explanation.json``'s path."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "images.npy", lambda handle: np.save(handle, explained.images, allow_pickle=False))
    for name, found in explained.maps.items():
        atomic_write(folder / f"{name}.npy", lambda handle, found=found: np.save(handle, found.astype(np.float32),
                                                                                allow_pickle=False))
    overlays(explained, folder / "overlays.png", class_names)
    images = []
    for i, index in enumerate(explained.indices):
        images.append({
            "test_index": index, "label": int(explained.labels[i]), "label_name": class_names[int(explained.labels[i])],
            "predicted": int(explained.predicted[i]), "predicted_name": class_names[int(explained.predicted[i])],
            "proba": [round(float(p), 6) for p in explained.proba[i]],
            "regions": None if explained.regions is None else explained.regions[i],
            "faithfulness": explained.faithfulness[i],
        })
    document = {"schema": SCHEMA, "cell": cell, "grid": GRID, "attributions": sorted(explained.maps),
                "unavailable": explained.unavailable, "grad_cam_layer": explained.layer,
                "reference": "Gaussian blur of the image, sigma = side / 8",
                "summary": summary_rows(explained.faithfulness), "overlays": "overlays.png", "images": images}
    path = folder / "explanation.json"
    atomic_write(path, json.dumps(document, indent=1) + "\n")
    return path


def overlays(explained: Explained, path: Path, class_names: list[str]) -> None:
    """A grid of PNG overlays: one row per image; the image, each map over it, and the method's regions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt

    columns = ["image", *explained.maps] + (["regions"] if explained.regions is not None else [])
    rows = len(explained.indices)
    figure, axes = plt.subplots(rows, len(columns), figsize=(2.3 * len(columns), 2.5 * rows), squeeze=False)
    for i in range(rows):
        image = explained.images[i]
        shown = image if image.ndim == 3 else np.stack([image] * 3, axis=-1)
        for j, column in enumerate(columns):
            axis = axes[i, j]
            axis.imshow(shown)
            axis.set_xticks([])
            axis.set_yticks([])
            if column == "image":
                axis.set_title(f"#{explained.indices[i]} true {class_names[int(explained.labels[i])][:14]}\n"
                               f"pred {class_names[int(explained.predicted[i])][:14]} "
                               f"p={explained.proba[i].max():.2f}", fontsize=7)
            elif column == "regions":
                for region in explained.regions[i]:
                    x0, y0, x1, y1 = region["box"]
                    axis.add_patch(mpatches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.2,
                                                      edgecolor="yellow"))
                    axis.text(x0, y0, f"{region['similarity']:.2f}", color="yellow", fontsize=6, va="bottom")
                axis.set_title("regions (best descriptor in JSON)", fontsize=7)
            else:
                found = np.clip(explained.maps[column][i], 0, None)  # evidence for the predicted class only
                axis.imshow(found, cmap="jet", alpha=0.5, interpolation="nearest", vmin=0,
                            vmax=max(float(found.max()), 1e-12))
                auc = explained.faithfulness[i][column]
                axis.set_title(f"{column}\ndel {auc['deletion_auc']:.2f} ins {auc['insertion_auc']:.2f}", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def choose_indices(n_test: int, images: int | None, indices: list[int] | None) -> list[int]:
    """The test images to explain: ``indices`` as given, else the first ``images`` (default 8)."""
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < n_test]
        if bad:
            raise UserError(f"--indices {bad[0]} is outside the test split (0 to {n_test - 1})")
        return indices
    count = 8 if images is None else images
    if count < 1:
        raise UserError(f"--images must be >= 1, got {count}")
    return list(range(min(count, n_test)))


@dataclass
class FittedCell:
    """One cell fitted as a run fits it (:func:`fit_cell`)."""

    model: Any
    pair: Any
    extractor: Any
    dataset: Any
    cell: Any
    task: Any


def recorded_extraction(results: Path, grid: plan.Grid) -> ExtractionSettings | None:
    """The extraction settings a finished result in ``results`` (a run's results.jsonl) recorded for the one cell of
    ``grid`` (clean test split, whole test split), or None: explaining a run's own cell then uses its very features
    (a settings probe here, budgeted by this one cell, could choose others and so make another cell)."""
    if not Path(results).is_file():
        return None
    want = (grid.datasets[0].base_label, grid.size, grid.methods[0].label, grid.encoders[0].label, grid.shots[0],
            grid.seeds[0])
    for result in ResultsStore(results).load().values():
        key = result.key
        if (result.status is Status.OK and (key.dataset, key.size, key.method, key.encoder, key.k, key.seed) == want
                and key.corruption is None and key.max_test is None and result.environment.extraction):
            recorded = result.environment.extraction
            try:
                return ExtractionSettings(**{name: recorded.get(name) for name in ExtractionSettings.__dataclass_fields__})
            except TypeError:
                return None
    return None


def fit_cell(grid: plan.Grid, settings: plan.Settings, registry: Registry, log: Callable[[str], None] | None = None,
             extraction: Any = None, on_dataset: Callable[[Any], None] | None = None) -> FittedCell:
    """Fit the one cell of ``grid`` (one dataset, method, encoder, k and seed) as a run fits it: the same support set,
    features (cache, settings), seeds and method cache folder (:func:`hica_bench.cell.prepare`). ``extraction``:
    fixed extraction settings (:func:`recorded_extraction`) instead of the cache's remembered or probed ones.
    ``on_dataset(dataset)`` is called once the dataset is open, before anything is encoded or fitted (to check
    input that depends on it)."""
    datasets, prompt_files = plan.open_datasets(grid, settings)
    choice, encoder, method = grid.datasets[0], grid.encoders[0], grid.methods[0]
    dataset = datasets[choice.label]
    if volumes.volumetric(dataset):
        raise UserError(f"explain works on 2D images; {choice.label} holds 3D volumes")
    if on_dataset is not None:
        on_dataset(dataset)
    built = encoder_pair(encoder, settings.device)
    pair = built.pair() if isinstance(built, LazyEncoderPair) else built
    needs = {method.label: method_needs(method)}
    extractor = FeatureExtractor(pair, settings.cache_dir, settings.extraction, log=log, settings=extraction,
                                 work=plan.work(grid, datasets, needs))
    cells, _, _ = plan.pending(grid, registry, choice, dataset, encoder, pair, extractor, settings.device, set(),
                               prompt_files.get(choice.label))
    one = cells[0]
    train_labels = np.asarray(dataset.split("train").labels)
    train_features = extractor.features(dataset, "train")[0] if needs[method.label] & FEATURE_NEEDS else None
    try:
        model, _, task = prepare(one, dataset, pair, (train_features, train_labels), RunComponents(registry),
                                 settings.cache_dir / "methods")
        model.fit(task)
    except NotApplicable as exc:
        raise UserError(f"{method.label} is not applicable here: {exc}") from None
    except UserError:
        raise
    except Exception as exc:  # the cell fails in a run too; here there is nothing to explain
        raise UserError(f"cannot explain: {method.label}'s fit failed ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:300]})") from None
    return FittedCell(model, pair, extractor, dataset, one, task)


def explain_cell(grid: plan.Grid, settings: plan.Settings, registry: Registry, images: int | None = None,
                 indices: list[int] | None = None, log: Callable[[str], None] | None = None) -> tuple[Path, dict]:
    """Fit the one cell of ``grid`` (:func:`fit_cell`), explain the chosen test images and write them under
    ``settings.out_dir/explanations/``; returns (explanation.json, its summary). When the folder holds a run's
    results, the CLI publishes its report again (:mod:`hica_bench.publish`), with the explanations in it."""
    results = Path(settings.out_dir) / "results.jsonl"
    with digests_remembered_in(settings.cache_dir):
        checked: list[list[int]] = []  # the images to explain, checked against the test split before any fitting
        fitted = fit_cell(grid, settings, registry, log, recorded_extraction(results, grid),
                          on_dataset=lambda dataset: checked.append(
                              choose_indices(len(dataset.split("test").labels), images, indices)))
        test = fitted.dataset.split("test")
        chosen = checked[0]
        order = np.argsort(chosen, kind="stable")  # read the (memory-mapped) split in index order
        picked = np.asarray(test.images[np.asarray(chosen)[order]])[np.argsort(order)]
        explained = explain_images(fitted.model, fitted.pair, fitted.extractor, picked, np.asarray(test.labels)[chosen],
                                   chosen, seed=fitted.cell.key.seed)
    key, model = fitted.cell.key, fitted.model
    described = {"dataset": key.dataset, "size": key.size, "method": key.method, "encoder": key.encoder, "k": key.k,
                 "seed": key.seed, "cell_id": fitted.cell.identity.id, "support": fitted.cell.identity.support,
                 "features": fitted.extractor.identity_for(fitted.dataset).as_dict(),
                 "fit_info": _jsonable(getattr(model, "fit_info_", None))}
    path = write(explained, Path(settings.out_dir) / "explanations" / folder_name(key), described,
                 list(fitted.task.class_names))
    return path, {"summary": summary_rows(explained.faithfulness), "unavailable": explained.unavailable,
                  "layer": explained.layer, "images": len(chosen)}


def _jsonable(value: Any) -> Any:
    return None if value is None else jsonable(value)
