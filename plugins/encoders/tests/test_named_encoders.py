"""The encoders the field uses, by name (issue 19): each family built from a tiny random-init model saved in that
family's real on-disk format (``save_pretrained`` folders for transformers CLIP, SigLIP and DINOv2; an
``open_clip_config.json`` folder for QuiltNet), loaded through its entry, checked with the conformance kit, and, for
aligned pairs, a zero-shot and a Tip-Adapter cell run end to end on BreastMNIST through the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
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
    ("medclip", "medclip needs checkpoint="),
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
                                             ("coop", {"epochs": 1}), ("hica", {"epochs": 2, "stage1_epochs": 1})])
def test_methods_that_adapt_or_feed_the_towers_run_on_a_transformers_clip(method, options, tiny_hf_clip):
    """clip-lora's LoRA on separate q_proj/k_proj/v_proj layers, fine-tuning the vision tower's last block, CoOp
    through the text tower, HiCA's ROIs where the token map (32 wide) is not in the 16-wide embedding space (each
    crop re-encoded): the conformance kit on the transformers pair."""
    testing.check_method(REGISTRY.get("method", method).spec, options, pair=build(f"hf-clip:path={tiny_hf_clip}"))


# --------------------------------------------------------------------------- MedCLIP (its release layout)


class _MedCLIPLayout(torch.nn.Module):
    """MedCLIP's module tree as its release checkpoint names it (medclip 0.0.3, modeling_medclip.py), at a tiny size:
    vision_model.{model, projection_head} (Swin) or vision_model.model with fc (ResNet-50), text_model.{model,
    projection_head} (BERT), logit_scale."""

    def __init__(self, bert: Path, swin: Path | None, dim: int = 16) -> None:
        import torchvision
        from transformers import AutoConfig, AutoModel

        super().__init__()
        self.vision_model, self.text_model = torch.nn.Module(), torch.nn.Module()
        if swin is not None:
            self.vision_model.model = AutoModel.from_config(AutoConfig.from_pretrained(swin))
            self.vision_model.projection_head = torch.nn.Linear(32, dim, bias=False)
        else:
            self.vision_model.model = torchvision.models.resnet50(weights=None)
            self.vision_model.model.fc = torch.nn.Linear(2048, dim, bias=False)
        self.text_model.model = AutoModel.from_config(AutoConfig.from_pretrained(bert))
        self.text_model.projection_head = torch.nn.Linear(32, dim, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.log(torch.tensor(1 / 0.07)))

    def text(self, tokens) -> torch.Tensor:
        """MedCLIPTextModel.forward: hidden states 1, 2 and -1 stacked, mean over tokens then layers, projected."""
        out = self.text_model.model(**tokens, output_hidden_states=True)
        stacked = torch.stack([out.hidden_states[1], out.hidden_states[2], out.hidden_states[-1]])
        return self.text_model.projection_head(stacked.permute(1, 0, 2, 3).mean(2).mean(1))


@pytest.fixture(scope="module")
def medclip_bases(tmp_path_factory) -> tuple[Path, Path]:
    """Bio_ClinicalBERT-like and Swin-T-like base folders holding configs and a tokenizer only (no weights)."""
    from transformers import BertConfig, SwinConfig

    bert, swin = tmp_path_factory.mktemp("medclip-bert"), tmp_path_factory.mktemp("medclip-swin")
    BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=128).save_pretrained(bert)
    tokenizer_into(bert)
    SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4
               ).save_pretrained(swin)
    return bert, swin


def medclip_release(folder: Path, bert: Path, swin: Path | None) -> tuple[Path, _MedCLIPLayout]:
    """A random MedCLIP saved as its release zip holds it: ``pytorch_model.bin``, torch.save of the state dict."""
    torch.manual_seed(0)
    model = _MedCLIPLayout(bert, swin).eval()
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin", model


def medclip_package(site: Path, bert: Path, swin: Path) -> None:
    """The installed medclip package's files (what `pip install --no-deps medclip` puts in site-packages): an
    __init__ that must never run here, and a constants.py in its own format (test values)."""
    (site / "medclip").mkdir(parents=True)
    (site / "medclip" / "__init__.py").write_text("raise ImportError('the medclip package must not be imported')\n")
    (site / "medclip" / "constants.py").write_text(
        f"'''drawn from Gloria'''\n\nBERT_TYPE = {str(bert)!r}\nVIT_TYPE = {str(swin)!r}\n\nIMG_SIZE = 32\n"
        "IMG_MEAN = .5862785803043838\nIMG_STD = .27950088968644304\n\nCHEXPERT_TASKS = ['No Finding']\n")


def test_medclip_from_its_release_checkpoint(medclip_bases, medmnist_root, tmp_path, monkeypatch):
    bert, swin = medclip_bases
    checkpoint, reference = medclip_release(tmp_path / "medclip-vit", bert, swin)
    medclip_package(tmp_path / "site", bert, swin)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    pair = build(f"medclip:checkpoint={checkpoint.parent}")  # the folder; text/swin from the package's constants
    testing.check_encoder(pair)
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert pair.aligned and pair.image.identity.startswith(f"medclip:swin:sha256={digest}:swin=")
    import shutil

    other = tmp_path / "other-bert"  # another vocabulary changes the text features: another text identity
    shutil.copytree(bert, other)
    (other / "vocab.txt").write_text((bert / "vocab.txt").read_text() + "opacity\n")
    rebuilt = build(f"medclip:checkpoint={checkpoint.parent}:text={other}")
    assert rebuilt.image.identity == pair.image.identity and rebuilt.text.identity != pair.text.identity
    assert pair.image.embed_dim == pair.text.embed_dim == 16
    spec = pair.image.input_spec  # the package's published preprocessing, grey mean/std on all three channels
    assert (spec.size, spec.mean, spec.std, spec.interpolation) == (32, (.5862785803043838,) * 3,
                                                                    (.27950088968644304,) * 3, "bicubic")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bert)
    texts = ["chest x ray", "a chest x ray of a malignant breast tumor"]
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():  # the loaded towers compute what MedCLIP's forward does with the same weights
        expected = reference.vision_model.projection_head(reference.vision_model.model(pixel_values=x).pooler_output)
        torch.testing.assert_close(pair.image.encode(x), expected)
        alone = [reference.text(tokenizer([t], return_tensors="pt"))[0].numpy() for t in texts]
        dense = pair.image.dense(x)  # the projected token map, whose mean is the image embedding
        assert dense.shape == (2, 16, 4, 4)
        torch.testing.assert_close(dense.mean(dim=(2, 3)), expected)
    batched = pair.text.encode(texts)  # padded together, yet each row is the text's embedding alone
    np.testing.assert_allclose(batched, np.stack(alone), rtol=1e-4, atol=1e-5)
    results = cells(medmnist_root, tmp_path, f"medclip:checkpoint={checkpoint}")
    assert results["zero-shot"]["status"] == results["tip-adapter"]["status"] == "ok"
    assert results["zero-shot"]["identity"]["origin"]["features"]["encoder"] == pair.image.identity


def test_medclip_resnet_release_and_a_processor_config_beside_it(medclip_bases, tmp_path):
    """The ResNet-50 variant (read off the checkpoint's keys), preprocessing from a preprocessor_config.json beside
    the checkpoint (no medclip package installed)."""
    from transformers import CLIPImageProcessor

    bert, _ = medclip_bases
    checkpoint, reference = medclip_release(tmp_path / "medclip-resnet", bert, None)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, image_mean=list(MEAN),
                       image_std=list(STD)).save_pretrained(checkpoint.parent)
    pair = build(f"medclip:checkpoint={checkpoint}:text={bert}")
    testing.check_encoder(pair)
    assert pair.image.identity.startswith("medclip:resnet:sha256=") and pair.image.input_spec.size == 64
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(pair.image.encode(x), reference.vision_model.model(x))
        dense = pair.image.dense(x)  # fc at every position: its mean is the embedding (average pool, then fc)
        assert dense.shape == (2, 16, 2, 2)
        torch.testing.assert_close(dense.mean(dim=(2, 3)), pair.image.encode(x), rtol=1e-5, atol=1e-4)


def test_medclip_bad_input_is_one_line(medclip_bases, tmp_path):
    from transformers import CLIPImageProcessor

    bert, swin = medclip_bases
    checkpoint, reference = medclip_release(tmp_path / "medclip-vit", bert, swin)
    broken = tmp_path / "broken"  # beside a processor config, so that the weights are what is read next
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(broken)
    state = reference.state_dict()
    del state["text_model.model.encoder.layer.1.output.dense.weight"]
    torch.save(state, broken / "cut.bin")
    torch.save({"weights": object()}, broken / "pickle.bin")  # not a plain state dict: weights_only refuses it
    options = f"text={bert}:swin={swin}"
    cases = {"medclip": "medclip needs checkpoint=",
             f"medclip:checkpoint={tmp_path / 'none.bin'}": "no such file or folder",
             f"medclip:checkpoint={tmp_path}": "the folder holds none of pytorch_model.bin",
             f"medclip:checkpoint={checkpoint}:{options}": "pip install --no-deps medclip",
             f"medclip:checkpoint={broken / 'cut.bin'}:{options}": "1 missing, 0 unexpected tensors",
             f"medclip:checkpoint={broken / 'pickle.bin'}:{options}": "cannot read weights from"}
    for text, expected in cases.items():
        with pytest.raises(UserError) as raised:
            build(text)
        assert expected in str(raised.value) and "\n" not in str(raised.value), raised.value


@pytest.mark.parametrize("method, options", [("clip-lora", {"iterations": 3}), ("finetune", {"steps": 3}),
                                             ("hica", {"epochs": 2, "stage1_epochs": 1})])
def test_methods_that_adapt_or_read_rois_run_on_medclip(method, options, medclip_bases, tmp_path, monkeypatch):
    """LoRA on the Swin's and BERT's query/key/value layers, fine-tuning the Swin's last stage, and HiCA's ROI
    features pooled from the projected map: the conformance kit on MedCLIP."""
    bert, swin = medclip_bases
    checkpoint, _ = medclip_release(tmp_path / "medclip-vit", bert, swin)
    medclip_package(tmp_path / "site", bert, swin)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    testing.check_method(REGISTRY.get("method", method).spec, options, pair=build(f"medclip:checkpoint={checkpoint}"))
