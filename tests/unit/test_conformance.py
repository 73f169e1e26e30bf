"""The conformance kit (``hica_bench.testing``) over every plugin the registry holds, so a newly installed plugin
is checked without touching this file; and the kit itself, on plugins broken on purpose."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_medmnist3d_npz, write_medmnist_npz
from hica_bench import testing
from hica_bench.errors import NotApplicable, UserError
from hica_bench.interfaces import EncoderPair, PluginSpec, Split
from hica_bench.registry import load_registry

REGISTRY = load_registry()
#: Options that shorten training or shrink widths for the check (the contract does not depend on them).
SHORT = {"epochs": 1, "stage1_epochs": 1, "dim": 16, "steps": 3, "iterations": 3, "stage1_encoder_epochs": 1}
#: A tiny random-init CLIP in open_clip's config format (the open-clip plugin's ``model=local-dir:`` path).
TINY_CLIP = {"model_cfg": {"embed_dim": 32,
                           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
                           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}},
             "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}
#: Options that make an encoder cheap or buildable offline; any other encoder is built with its defaults.
ENCODER_OPTIONS = {"open-clip": "model=local-dir:{tiny_clip}:pretrained=random", "timm": "model=resnet10t:text=:checkpoint=random"}


def tiny_clip_checkpoint(folder: Path) -> Path:
    """``folder`` holding :data:`TINY_CLIP`'s ``open_clip_config.json`` and a random-init checkpoint (seed 0) in
    open_clip's own file name: a local model as ``local-dir:`` and ``hf-hub:`` snapshots hold one."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", pretrained_text=False)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def names(kind: str) -> list[str]:
    return sorted(REGISTRY.specs(kind))


def spec(kind: str, name: str) -> PluginSpec:
    found = REGISTRY.get(kind, name).spec
    testing.check_spec(found, kind)
    return found


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-clip")
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dir) -> EncoderPair:
    """A real aligned pair, for methods that decline the kit's toy pair (they need a real text tower)."""
    return REGISTRY.choose("encoder", f"open-clip:model=local-dir:{tiny_clip_dir}:pretrained=random").build(device="cpu")


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


# --------------------------------------------------------------------------- every registered plugin


@pytest.mark.parametrize("name", names("method"))
def test_method(name, request):
    method = spec("method", name)
    options = {k: v for k, v in SHORT.items() if k in method.options}
    try:
        testing.check_method(method, options)
    except AssertionError as exc:
        if not isinstance(exc.__cause__, NotApplicable):
            raise
        testing.check_method(method, options, pair=request.getfixturevalue("tiny_clip"))


@pytest.mark.parametrize("name", names("encoder"))
def test_encoder(name, tiny_clip_dir, offline_hub):
    spec("encoder", name)
    text = f"{name}:{ENCODER_OPTIONS[name].format(tiny_clip=tiny_clip_dir)}" if name in ENCODER_OPTIONS else name
    choice = REGISTRY.choose("encoder", text)
    try:
        pair = choice.build(device="cpu")
    except UserError as exc:  # e.g. weights only on the Hugging Face Hub, which this machine cannot reach
        pytest.skip(f"{text} cannot be built offline: {exc}")
    testing.check_encoder(pair)
    card = choice.describe(device="cpu")
    if card is not None:  # a spec that describes itself must agree with what it builds
        testing.check_encoder_card(card, pair)


@pytest.mark.parametrize("name", names("dataset"))
def test_dataset_in_medmnist_format(name, tmp_path):
    """Each dataset built from a small file in the MedMNIST format (class count and channels from medmnist)."""
    medmnist = pytest.importorskip("medmnist")
    info = medmnist.INFO.get(name)
    root = str(tmp_path)
    if info is not None:
        n = len(info["label"])
        if name.endswith("3d"):  # volumes (N, 28, 28, 28)
            write_medmnist3d_npz(tmp_path / f"{name}.npz", n_classes=n, counts=(3 * n, n, 2 * n))
        else:
            write_medmnist_npz(tmp_path / f"{name}.npz", n_classes=n, rgb=info["n_channels"] == 3, counts=(3 * n, n, 2 * n),
                               multilabel=info["task"].startswith("multi-label"))
    elif name == "folder":  # the same kind of file's images as PNG files in split and class folders
        from PIL import Image

        with np.load(write_medmnist_npz(tmp_path / "toy.npz", n_classes=3, counts=(9, 3, 6))) as arrays:
            for split in ("train", "val", "test"):
                for i, (x, y) in enumerate(zip(arrays[f"{split}_images"], arrays[f"{split}_labels"][:, 0])):
                    (tmp_path / "images" / split / f"class{y}").mkdir(parents=True, exist_ok=True)
                    Image.fromarray(x).save(tmp_path / "images" / split / f"class{y}" / f"{i}.png")
        root = str(tmp_path / "images")
    try:
        dataset = spec("dataset", name).factory(root=root, size=28, download=False, cache_dir=tmp_path / "cache")
    except UserError as exc:
        pytest.skip(f"{name}: no small file of its format to build it from ({exc})")
    testing.check_dataset(dataset)


def test_real_breastmnist(medmnist_root, tmp_path):
    testing.check_dataset(spec("dataset", "breastmnist").factory(root=str(medmnist_root), size=28, download=False,
                                                                  cache_dir=tmp_path))


def component(kind: str, name: str):
    """Built as a run builds it for a method: through the run's components (declared component options resolved)."""
    spec(kind, name)
    return testing.installed_components().build(kind, name)


@pytest.mark.parametrize("name", names("roi-extractor"))
def test_roi_extractor(name):
    testing.check_roi_extractor(component("roi-extractor", name))


@pytest.mark.parametrize("name", names("descriptor-generator"))
def test_descriptor_generator(name):
    testing.check_descriptor_generator(component("descriptor-generator", name))


@pytest.mark.parametrize("name", names("loss"))
def test_loss(name):
    testing.check_loss(component("loss", name))


def test_the_kit_pair_conforms():
    testing.check_encoder(testing.toy_pair())
    testing.check_encoder(testing.toy_pair(text=False))


# --------------------------------------------------------------------------- the kit catches broken plugins


class Prototype:
    """A correct method; the broken ones below change one thing each."""

    needs = frozenset({"image_features"})

    def fit(self, task):
        x = task.support_features / np.linalg.norm(task.support_features, axis=1, keepdims=True)
        self.means_ = np.stack([x[task.support_labels == c].mean(0) for c in range(task.n_classes)])
        return self

    def scores(self, features):
        return features / np.linalg.norm(features, axis=1, keepdims=True) @ self.means_.T

    def predict_proba(self, features):
        s = np.exp(self.scores(features) * 10)
        return s / s.sum(1, keepdims=True)


class ListOption(Prototype):
    def __init__(self, sizes=(1,)):  # a default the command line cannot give
        self.sizes = sizes


class Mutates(Prototype):
    def fit(self, task):
        task.support_features /= 2
        return super().fit(task)


class Unnormalised(Prototype):
    def predict_proba(self, features):
        return np.exp(self.scores(features))


class Unseeded(Prototype):
    def fit(self, task):
        super().fit(task)
        self.means_ += np.random.default_rng().normal(0, 0.1, self.means_.shape)
        return self


class BatchDependent(Prototype):
    def predict_proba(self, features):
        s = np.exp(self.scores(features) * len(features))
        return s / s.sum(1, keepdims=True)


class UndeclaredTrainFeatures(Prototype):
    def fit(self, task):
        self.centre_ = task.train_features.mean(0)
        return super().fit(task)


class ReturnsNone(Prototype):
    def fit(self, task):
        super().fit(task)


class ReturnsList(Prototype):
    def predict_proba(self, features):
        return super().predict_proba(features).tolist()


class UnknownNeed(Prototype):
    needs = frozenset({"image_features", "gpu"})


class ObjectInFitInfo(Prototype):
    def fit(self, task):
        self.fit_info_ = {"scaler": object()}
        return super().fit(task)


class BatchCentred:
    """Centres features on the batch mean (as batch norm in training mode does)."""

    identity = "broken:batch-centred"
    input_spec = testing.ToyImageEncoder.input_spec
    embed_dim = 3

    def encode(self, images):
        pooled = images.mean((2, 3))
        return pooled - pooled.mean(0)


class FloatLabels:
    name, size, task, class_names, identity = "broken", 28, "binary-class", ["a", "b"], "broken-v1"

    def split(self, name):
        return Split(testing.toy_images(np.arange(4) % 2), (np.arange(4) % 2).astype(np.float32))


class OneClassInTrain(FloatLabels):
    def split(self, name):
        return Split(testing.toy_images(np.zeros(4, int)), np.zeros(4, np.int64))


class BoxesOutside:
    def extract(self, images, k, dense=None):
        return torch.tensor([[0, 0, images.shape[-1] + 1, 4]] * k).expand(len(images), -1, -1)


class NoGlobal:
    def describe(self, dataset, class_names):
        return [{"global": [], "local": ["x"]} for _ in class_names]


class NotScalar(torch.nn.Module):
    def forward(self, *, image_embeddings, labels):
        return image_embeddings.sum(1)


class Detached(torch.nn.Module):
    def forward(self, *, image_embeddings, labels):
        return image_embeddings.detach().sum()


@pytest.mark.parametrize("check, broken, message", [
    (testing.check_method, Mutates, "modified its input support_features"),
    (testing.check_method, Unnormalised, "sum to 1"),
    (testing.check_method, Unseeded, "not deterministic"),
    (testing.check_method, BatchDependent, "depend on the other images"),
    (testing.check_method, UndeclaredTrainFeatures, "fit raised AttributeError"),
    (testing.check_method, ReturnsNone, "fit must return self"),
    (testing.check_method, ReturnsList, "not a numpy array"),
    (testing.check_method, UnknownNeed, "unknown needs ['gpu']"),
    (testing.check_method, ObjectInFitInfo, "fit_info_ is not JSON"),
    (testing.check_method, PluginSpec("method", "p", "options must be CLI-typed", ListOption), "defaults must be"),
    (testing.check_encoder, EncoderPair(BatchCentred(), None, False), "depend on the other images in its batch"),
    (testing.check_encoder, EncoderPair(testing.ToyImageEncoder(), None, True), "aligned pair needs a text encoder"),
    (testing.check_dataset, FloatLabels(), "labels must be int64"),
    (testing.check_dataset, OneClassInTrain(), "classes [1] have no train images"),
    (testing.check_roi_extractor, BoxesOutside(), "boxes outside"),
    (testing.check_descriptor_generator, NoGlobal(), "has no global text"),
    (testing.check_loss, NotScalar(), "expected a float scalar tensor"),
    (testing.check_loss, Detached(), "not differentiable"),
])
def test_the_kit_catches(check, broken, message):
    with pytest.raises(AssertionError) as info:
        check(broken)
    assert message in str(info.value)


def test_the_kit_passes_a_correct_method():
    testing.check_method(Prototype)
