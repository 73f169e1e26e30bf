#!/usr/bin/env bash
# The GPU benchmarks (benchmarks/test_gpu.py) on a machine that has CUDA, PyTorch and the usual scientific packages but
# no network and no hica-bench: a machine lent for a few minutes, such as the developers' device machine
# (docs/development.md#measuring-on-a-lent-gpu). Two steps:
#
#   bash benchmarks/gpu_kit.sh prepare          # here (the project's venv active), with the network and MedMNIST's
#                                               # files ($HICA_BENCH_DATA): fills .gpu-kit/ (~5 MB)
#   bash benchmarks/gpu_kit.sh run [PYTEST...]  # there, in a copy of the repository with .gpu-kit/ beside the code;
#                                               # e.g. `run -k eager` and `run -k compile` as two shorter commands
#
# `run` installs the kit's wheels (medmnist, which the dataset plugin reads its catalogue from) into /tmp/site, the
# project and its MedMNIST and encoder plugins without dependencies (their entry points), then runs
# `python3 -m pytest benchmarks -m gpu -s`: eager and --compile, PneumoniaMNIST's train split. The encoder is
# EfficientNet-Lite0 (the default pair's image tower) with random weights, labelled so in the report: the MiniLM weights
# package (87 MB) does not travel, and a bench times the images only, at speeds that do not depend on the weights'
# values (the feature check's AMP tolerances were measured with the ImageNet weights: with random ones its line is
# only indicative). The JSON reports, the log, and a failed worker's stderr go to $OUT (default ./gpu-reports).
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu-kit

case "${1:-}" in
prepare)
    data="${HICA_BENCH_DATA:-../shared/data/medmnist}"
    mkdir -p "$KIT/whl" "$KIT/data"
    for name in pneumoniamnist breastmnist; do  # the benchmarks' conftest looks for BreastMNIST's file
        cp "$data/$name.npz" "$KIT/data/"
    done
    version=$(python3 -c 'import importlib.metadata as m; print(m.version("medmnist"))')  # the one installed here
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$KIT/whl" "medmnist==$version"
    du -sh "$KIT"
    ;;
run)
    out="${OUT:-gpu-reports}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$KIT"/whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . -e plugins/medmnist -e plugins/encoders
    python3 -c 'import torch; print("torch", torch.__version__, "CUDA", torch.cuda.is_available(),
        torch.cuda.get_device_name() if torch.cuda.is_available() else "")' | tee "$out/gpu.log"
    cache=/tmp/hica-bench-gpu-cache
    rc=0
    HICA_BENCH_DATA="$PWD/$KIT/data" HICA_BENCH_CACHE="$cache" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
        HICA_BENCH_GPU_ENCODER="timm:model=tf_efficientnet_lite0:checkpoint=random:text=" \
        HICA_BENCH_GPU_REPORTS="$out" \
        python3 -m pytest benchmarks -m gpu -s -p no:cacheprovider -rs "${@:2}" 2>&1 | tee -a "$out/gpu.log" || rc=$?
    cp "$cache"/bench-logs/*.stderr "$out"/ 2>/dev/null || true  # a failed worker's traceback (hica-bench bench keeps it)
    exit "$rc"
    ;;
*)
    echo "usage: bash benchmarks/gpu_kit.sh prepare|run" >&2
    exit 2
    ;;
esac
