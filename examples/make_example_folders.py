"""Make two small folders in the layouts BUSI and the Kermany chest X-rays come in, to try the worked example
of the own-data page (docs/own-data.md) without downloading either:

- ``chest_xray/{train,test}/{NORMAL,PNEUMONIA}/*.jpeg``: real paediatric chest X-rays, PneumoniaMNIST's (which are
  Kermany et al.'s images, resized by MedMNIST), with their true labels and official splits, upscaled to 96 x 112 px
  JPEGs (a subset: ``--per-class`` train images per class, a third as many test images);
- ``Dataset_BUSI_with_GT/{benign,malignant,normal}/"<class> (<i>).png"`` plus ``"<class> (<i>)_mask.png"`` files:
  **synthetic** grey 100 x 120 px images (a class-specific bright blob over speckle), since no public MedMNIST file has
  BUSI's three classes. Numbers on this folder say nothing about breast ultrasound; it exists to exercise the layout.

Usage: ``python examples/make_example_folders.py [--data-root DIR] [--out DIR] [--per-class N]`` (the MedMNIST
folder defaults to ``$HICA_BENCH_DATA``, else medmnist's ``~/.medmnist``; PneumoniaMNIST is downloaded there by
``hica-bench download pneumoniamnist`` when missing).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image


def kermany_style(npz: Path, out: Path, per_class: int) -> None:
    names = ("NORMAL", "PNEUMONIA")  # PneumoniaMNIST's labels 0 and 1
    with np.load(npz) as arrays:
        for split, count in (("train", per_class), ("test", max(per_class // 3, 1))):
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"][:, 0]
            for c, name in enumerate(names):
                folder = out / "chest_xray" / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i in np.flatnonzero(labels == c)[:count]:
                    image = Image.fromarray(images[i]).resize((112, 96), Image.Resampling.BICUBIC)
                    image.save(folder / f"{name.lower()}-{i:05d}.jpeg", quality=90)


def busi_style(out: Path, per_class: int) -> None:
    rng = np.random.default_rng(0)
    centres = {"benign": (0.35, 0.35), "malignant": (0.5, 0.65), "normal": (0.7, 0.3)}
    yy, xx = np.mgrid[0:100, 0:120]
    for name, (cy, cx) in centres.items():
        folder = out / "Dataset_BUSI_with_GT" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(1, per_class + 1):
            speckle = rng.gamma(2.0, 30.0, size=(100, 120))
            blob = ((yy - cy * 100) ** 2 + (xx - cx * 120) ** 2) < (18 + rng.normal(0, 2)) ** 2
            image = np.clip(speckle + 90 * blob, 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / f"{name} ({i}).png")
            Image.fromarray((blob * 255).astype(np.uint8)).save(folder / f"{name} ({i})_mask.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("HICA_BENCH_DATA") or str(Path.home() / ".medmnist"))
    parser.add_argument("--out", default=".")
    parser.add_argument("--per-class", type=int, default=60)
    args = parser.parse_args()
    npz = Path(args.data_root).expanduser() / "pneumoniamnist.npz"
    if not npz.exists():
        raise SystemExit(f"{npz} is missing: run `hica-bench download pneumoniamnist --data-root {args.data_root}`")
    out = Path(args.out)
    kermany_style(npz, out, args.per_class)
    busi_style(out, args.per_class)
    print(f"made {out / 'chest_xray'} (real PneumoniaMNIST X-rays) and {out / 'Dataset_BUSI_with_GT'} (synthetic)")


if __name__ == "__main__":
    main()
