"""3D volumes (issue 22): MedMNIST 3D files in their exact format, read slice by slice by 2D encoders (pooled per
volume) or whole by a MONAI 3D network, through the one extraction service; methods, protocol and tables unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TEST_PLUGINS, invoke, write_medmnist3d_npz
from hica_bench import testing, volumes
from hica_bench.errors import UserError
from hica_bench.registry import load_registry

REGISTRY = load_registry()


@pytest.fixture(scope="module")
def data3d(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data3d")
    write_medmnist3d_npz(root / "adrenalmnist3d.npz")  # 28 voxels
    write_medmnist3d_npz(root / "nodulemnist3d_64.npz", size=64, counts=(12, 3, 6), seed=1)
    return root


def dataset(data3d: Path, text: str = "adrenalmnist3d", size: int = 28, cache: Path | None = None):
    return REGISTRY.choose("dataset", text).build(root=str(data3d), size=size, download=False,
                                                  cache_dir=cache or data3d / "cache")


def _run(data3d: Path, tmp_path: Path, *args, encoder: str = "pixels") -> tuple[int, str, str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TEST_PLUGINS))
        return invoke("-p", "pixel_encoder", "run", "--encoder", encoder, "--data-root", data3d, "--no-download",
                      "--cache-dir", tmp_path / "cache", "--no-report", "-q", *args)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_a_3d_grid_end_to_end_with_caching_and_the_slicing_in_the_identity(data3d, tmp_path):
    """A full run on volumes with a 2D encoder: ordinary results whose feature identity says how volumes were read;
    a rerun into another folder is served from the cache; another axis or pooling is another identity and cache
    entry; adapting methods are not applicable; the synthetic classes (a bright octant) are learnt."""
    args = ["--datasets", "adrenalmnist3d", "--methods", "linear-probe,prototype,finetune", "--shots", "1,5",
            "--seeds", "0,1"]
    code, _, err = _run(data3d, tmp_path, *args, "--out", tmp_path / "a")
    assert code == 0, err
    records = _records(tmp_path / "a")
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 8 and {r["key"]["method"] for r in ok} == {"linear-probe", "prototype"}
    assert all(r["identity"]["origin"]["features"]["volume"] == "slices:axis=0:pool=mean" for r in records)
    assert all("reads the 2D images themselves" in r["reason"] for r in records if r["key"]["method"] == "finetune")
    assert np.mean([r["metrics"]["auc"] for r in ok if r["key"]["k"] == 5]) > 0.9
    entries = set((tmp_path / "cache" / "features").glob("*.npy"))
    assert len(entries) == 2  # train and test
    code, _, err = _run(data3d, tmp_path, *args, "--out", tmp_path / "b")
    assert code == 0 and set((tmp_path / "cache" / "features").glob("*.npy")) == entries  # all from the cache
    assert [r["cell_id"] for r in _records(tmp_path / "b")] == [r["cell_id"] for r in records]
    code, _, err = _run(data3d, tmp_path, *args, "--slice-axis", "planes", "--slice-pool", "max", "--out", tmp_path / "c")
    assert code == 0, err
    other = _records(tmp_path / "c")
    assert {r["identity"]["origin"]["features"]["volume"] for r in other} == {"slices:axis=planes:pool=max"}
    assert not {r["cell_id"] for r in other} & {r["cell_id"] for r in records}
    assert len(set((tmp_path / "cache" / "features").glob("*.npy"))) == 4
    code, _, err = _run(data3d, tmp_path, *args, "--slice-step", "4", "--out", tmp_path / "d")  # a quarter of the slices
    assert code == 0, err
    stepped = _records(tmp_path / "d")
    assert {r["identity"]["origin"]["features"]["volume"] for r in stepped} == {"slices:axis=0:pool=mean:step=4"}
    assert not {r["cell_id"] for r in stepped} & {r["cell_id"] for r in records}


def test_64_voxel_volumes_run_the_same_way(data3d, tmp_path):
    code, _, err = _run(data3d, tmp_path, "--datasets", "nodulemnist3d", "--size", "64", "--methods", "prototype",
                        "--shots", "1", "--seeds", "0", "--out", tmp_path / "out")
    assert code == 0, err
    (record,) = _records(tmp_path / "out")
    assert record["status"] == "ok" and record["key"]["size"] == 64 and record["n_test"] == 6


@pytest.mark.slow
def test_a_monai_3d_network_is_a_native_volume_encoder(data3d, tmp_path):
    """monai-3d with random init (labelled): the conformance kit's volume checks; a saved checkpoint loads back to
    the same features under its file digest; a run on volumes records ``native-3d``."""
    from safetensors.torch import save_file

    pair = REGISTRY.choose("encoder", "monai-3d:model=resnet10:checkpoint=random:size=32:text=").build(device="cpu")
    testing.check_encoder(pair)
    assert pair.image.volumetric and pair.card.volumetric and pair.card.random_init and pair.image.embed_dim == 512
    save_file({k: v.contiguous() for k, v in pair.image.model.state_dict().items()}, tmp_path / "w.safetensors")
    loaded = REGISTRY.choose("encoder", f"monai-3d:model=resnet10:checkpoint={tmp_path / 'w.safetensors'}:size=32:text="
                             ).build(device="cpu")
    vols = dataset(data3d).split("test").images[:3]
    np.testing.assert_allclose(volumes.encode_native(vols, loaded.image, "cpu", 2),
                               volumes.encode_native(vols, pair.image, "cpu", 2), rtol=1e-5, atol=1e-6)
    assert "random-init" not in loaded.image.identity and "sha256=" in loaded.image.identity
    code, _, err = _run(data3d, tmp_path, "--datasets", "adrenalmnist3d", "--methods", "linear-probe", "--shots", "5",
                        "--seeds", "0", "--out", tmp_path / "out",
                        encoder="monai-3d:model=resnet10:checkpoint=random:size=32:text=")
    assert code == 0, err
    (record,) = _records(tmp_path / "out")
    assert record["status"] == "ok" and record["identity"]["origin"]["features"]["volume"] == volumes.NATIVE


@pytest.mark.parametrize("case, message", [
    ("axis", "--slice-axis must be 0, 1, 2 or planes"),
    ("pool", "--slice-pool must be mean or max"),
    ("step", "--slice-step must be a whole number from 1 (every slice) to 64, got 0"),
    ("3d-encoder-on-2d", "is a 3D encoder (it takes whole volumes); breastmnist holds 2D images"),
    ("2d-file-as-3d", "expected (N, 28, 28, 28) (a 3D dataset holds volumes)"),
    ("size", "adrenalmnist3d comes in sizes 28, 64"),
    ("checkpoint", "monai-3d needs checkpoint="),
    ("wrong-checkpoint", "does not fit MONAI's 3D resnet18"),
])
def test_bad_volume_input_is_one_line(case, message, data3d, medmnist_root, tmp_path):
    args = ["--datasets", "adrenalmnist3d", "--methods", "prototype", "--shots", "1", "--seeds", "0",
            "--out", tmp_path / "out"]
    encoder, root = "pixels", data3d
    if case == "axis":
        args += ["--slice-axis", "3"]
    elif case == "pool":
        args += ["--slice-pool", "median"]
    elif case == "step":
        args += ["--slice-step", "0"]
    elif case == "3d-encoder-on-2d":
        args[1], root, encoder = "breastmnist", medmnist_root, "monai-3d:checkpoint=random:size=32:text="
    elif case == "2d-file-as-3d":
        root = tmp_path / "data"
        root.mkdir()
        (root / "adrenalmnist3d.npz").write_bytes((medmnist_root / "breastmnist.npz").read_bytes())
    elif case == "size":
        args += ["--size", "128"]
    elif case == "checkpoint":
        encoder = "monai-3d:text="
    else:
        torch.save({"weight": torch.zeros(3)}, tmp_path / "w.pt")
        encoder = f"monai-3d:checkpoint={tmp_path / 'w.pt'}:text="
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TEST_PLUGINS))
        code, _, err = invoke("-p", "pixel_encoder", "run", "--encoder", encoder, "--data-root", root, "--no-download",
                              "--cache-dir", tmp_path / "cache", *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    with pytest.raises(UserError):
        volumes.VolumeOptions("x")
