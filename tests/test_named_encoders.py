"""The encoders the field uses, by name (issue 19): each family built from a tiny random-init model saved in that
family's real on-disk format (``save_pretrained`` folders for transformers CLIP, SigLIP and DINOv2; an
``open_clip_config.json`` folder for QuiltNet), loaded through its entry, checked with the conformance kit, and, for
aligned pairs, a zero-shot and a Tip-Adapter cell run end to end on BreastMNIST through the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import invoke
from hica_bench import testing
from hica_bench.errors import UserError
from hica_bench.registry import load_registry

REGISTRY = load_registry()
WORDS = ("[PAD] [UNK] [CLS] [SEP] [MASK] a an of on the with photo image medical scan showing findings malignant "
         "normal benign breast tissue ultrasound").split()
MEAN, STD = (0.25, 0.5, 0.75), (0.2, 0.3, 0.4)


def tokenizer_into(folder: Path) -> None:
    """A WordPiece tokenizer (the models are random: any tokenizer with ids inside the vocabulary will do)."""
    from transformers import BertTokenizer

    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-hf-clip")
    config = CLIPConfig(text_config=dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=32, pad_token_id=0,
                                         bos_token_id=2, eos_token_id=3),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=list(MEAN),
                       image_std=list(STD), resample=3).save_pretrained(folder)
    tokenizer_into(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory) -> Path:
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    folder = tmp_path_factory.mktemp("tiny-siglip")
    config = SiglipConfig(text_config=dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16),
                          vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=8))
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=list(MEAN), image_std=list(STD),
                         resample=2).save_pretrained(folder)
    tokenizer_into(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("tiny-dinov2")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=7)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, do_center_crop=True,
                      image_mean=list(MEAN), image_std=list(STD), resample=3).save_pretrained(folder)
    return folder


def build(text: str):
    return REGISTRY.choose("encoder", text).build(device="cpu")


def weights_sha256(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def cells(medmnist_root: Path, tmp_path: Path, encoder: str) -> dict[str, dict]:
    code, _, err = invoke("run", "--encoder", encoder, "--datasets", "breastmnist", "--methods", "zero-shot,tip-adapter",
                          "--shots", "1", "--seeds", "0", "--max-test", "32", "--data-root", medmnist_root,
                          "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out", "--no-report", "-q")
    assert code == 0, err
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    return {r["key"]["method"]: r for r in map(json.loads, lines)}


@pytest.mark.parametrize("family", ["hf-clip", "siglip"])
def test_transformers_clip_and_siglip_folders_are_aligned_pairs(family, tiny_hf_clip, tiny_siglip, medmnist_root,
                                                               tmp_path):
    folder = tiny_hf_clip if family == "hf-clip" else tiny_siglip
    pair = build(f"{family}:path={folder}")
    testing.check_encoder(pair)
    assert pair.aligned and pair.image.embed_dim == pair.text.embed_dim == (16 if family == "hf-clip" else 32)
    assert weights_sha256(folder) in pair.image.identity  # the identity carries the weights digest
    spec = pair.image.input_spec  # from the checkpoint's own preprocessor_config.json
    assert (spec.size, spec.mean, spec.std) == (32, MEAN, STD)
    assert spec.interpolation == ("bicubic" if family == "hf-clip" else "bilinear")
    with torch.inference_mode():
        assert pair.image.dense(torch.zeros(1, 3, 32, 32)).shape == (1, 32, 4, 4)
    results = cells(medmnist_root, tmp_path, f"{family}:path={folder}")
    assert results["zero-shot"]["status"] == results["tip-adapter"]["status"] == "ok"
    assert results["zero-shot"]["identity"]["origin"]["features"]["encoder"] == pair.image.identity


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("family", ["dinov2", "rad-dino"])
def test_dinov2_and_rad_dino_are_image_only_with_dense_features(family, pool, tiny_dinov2):
    pair = build(f"{family}:path={tiny_dinov2}:pool={pool}:text=")
    testing.check_encoder(pair)
    assert pair.text is None and not pair.aligned and pair.image.embed_dim == 32
    assert pair.image.identity.startswith(f"{family}:{pool}:sha256={weights_sha256(tiny_dinov2)}")
    assert pair.image.input_spec.size == 28 and pair.image.input_spec.mean == MEAN  # the crop size, not the resize
    x = torch.randn(2, 3, 28, 28)
    with torch.inference_mode():
        tokens = pair.image.model(pixel_values=x).last_hidden_state
        expected = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)
        torch.testing.assert_close(pair.image.encode(x), expected)
        assert pair.image.dense(x).shape == (2, 32, 4, 4)


def test_quiltnet_from_a_local_open_clip_folder(medmnist_root, tmp_path):
    from test_conformance import tiny_clip_checkpoint

    folder = tiny_clip_checkpoint(tmp_path / "quiltnet")
    pair = build(f"quiltnet:path={folder}")
    testing.check_encoder(pair)
    digest = hashlib.sha256((folder / "open_clip_pytorch_model.bin").read_bytes()).hexdigest()
    assert pair.aligned and pair.image.identity.startswith(f"quiltnet:sha256={digest}")
    results = cells(medmnist_root, tmp_path, f"quiltnet:path={folder}")
    assert results["zero-shot"]["status"] == results["tip-adapter"]["status"] == "ok"


@pytest.mark.parametrize("text, expected", [
    ("pubmedclip", "hf download flaviagiammarino/pubmed-clip-vit-base-patch32 --local-dir <folder>` and pass path="),
    ("rad-dino", "hf download microsoft/rad-dino --local-dir <folder>` and pass path="),
    ("quiltnet", "pass path=<folder with its open_clip_config.json and weights> (e.g. from `hf download wisdomik/QuiltNet-B-32 --local-dir <folder>`"),
    ("medclip", "medclip is not supported"),
    ("unimed-clip", "not published on PyPI"),
    ("hf-clip:path=/no/such/folder", "no such folder"),
])
def test_offline_or_unsupported_is_one_line(text, expected, tmp_path, monkeypatch):
    """Offline with an empty HF cache, a Hub name says what to download and where to pass it; one line, exit 2."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(UserError) as raised:
        build(text)
    assert expected in str(raised.value) and "\n" not in str(raised.value)
    code, out, err = invoke("run", "--encoder", text, "--datasets", "breastmnist", "--methods", "zero-shot",
                            "--shots", "1", "--seeds", "0", "--out", tmp_path / "out", "--cache-dir", tmp_path / "c")
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected.split("`")[0][:30] in err.replace("\n", " ")


@pytest.mark.parametrize("method, options", [("clip-lora", {"iterations": 3}), ("finetune", {"steps": 3}),
                                             ("coop", {"epochs": 1})])
def test_methods_that_adapt_or_feed_the_towers_run_on_a_transformers_clip(method, options, tiny_hf_clip):
    """clip-lora's LoRA on separate q_proj/k_proj/v_proj layers, fine-tuning the vision tower's last block, CoOp
    through the text tower: the conformance kit on the transformers pair."""
    testing.check_method(REGISTRY.get("method", method).spec, options, pair=build(f"hf-clip:path={tiny_hf_clip}"))
