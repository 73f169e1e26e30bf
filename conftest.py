"""Shared fixtures: the real MedMNIST files, MedMNIST-format arrays built on the fly, and the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent
TEST_PLUGINS = REPO / "tests" / "plugins"


def shared_medmnist() -> Path | None:
    for candidate in (os.environ.get("HICA_BENCH_DATA"), REPO.parent / "shared" / "data" / "medmnist"):
        if candidate and (Path(candidate) / "breastmnist.npz").exists():
            return Path(candidate)
    return None


if "HICA_BENCH_DATA" not in os.environ and shared_medmnist() is not None:
    # the files beside the checkout (README: "the tests look there too"), for the hica-bench processes the tests start
    # as well as for this one: as .ci/run sets it
    os.environ["HICA_BENCH_DATA"] = str(shared_medmnist())


@pytest.fixture(scope="session")
def medmnist_root() -> Path:
    root = shared_medmnist()
    if root is None:
        pytest.skip("real MedMNIST files not found (set HICA_BENCH_DATA to a folder with breastmnist.npz)")
    return root


@pytest.fixture(scope="session")
def default_encoder_cache(tmp_path_factory) -> Path:
    """One feature cache for every test that runs the real default encoder, so that BreastMNIST is encoded, the
    extraction settings probed and the encoder exported to ONNX once per test command: shared by the xdist workers of
    a session (the cache's own locks make a second process wait for an entry being computed, then read it) and, where
    ``$HICA_BENCH_CACHE`` names a folder (``.ci/run`` makes a fresh one per run), by the serial step and the lanes."""
    if os.environ.get("HICA_BENCH_CACHE"):
        path = Path(os.environ["HICA_BENCH_CACHE"]) / "tests-default-encoder"
    elif "PYTEST_XDIST_WORKER" in os.environ:  # the workers' temporary folders share their parent
        path = tmp_path_factory.getbasetemp().parent / "default-encoder-cache"
    else:
        return tmp_path_factory.mktemp("default-encoder-cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_medmnist_npz(path: Path, n_classes: int, size: int = 28, rgb: bool = False,
                       counts=(30, 10, 20), seed: int = 0, compressed: bool = True, multilabel: bool = False) -> Path:
    """A file in the exact MedMNIST format: uint8 images (N, S, S[, 3]) and uint8 labels (N, 1) per split; with
    ``multilabel``, ChestMNIST's: uint8 labels (N, n_classes) in {0, 1}, each image with its class's label and, one
    image in three, a second one.

    Class ``c`` (up to 16 classes) has a bright block at its own cell of a 4 × 4 grid over noise,
    so a classifier can learn something."""
    rng = np.random.default_rng(seed)
    block = size // 4
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        labels = np.arange(n) % n_classes
        rng.shuffle(labels)
        shape = (n, size, size, 3) if rgb else (n, size, size)
        images = rng.normal(90, 25, size=shape)
        for i, c in enumerate(labels):
            row, col = divmod(int(c), 4)
            images[i, row * block:(row + 1) * block, col * block:(col + 1) * block] += 120
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
        if multilabel:
            hot = np.zeros((n, n_classes), np.uint8)
            hot[np.arange(n), labels] = 1
            hot[np.arange(0, n, 3), (labels[::3] + 1) % n_classes] = 1
            arrays[f"{split}_labels"] = hot
    path.parent.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def write_medmnist3d_npz(path: Path, n_classes: int = 2, size: int = 28, counts=(24, 6, 12), seed: int = 0) -> Path:
    """A file in the exact MedMNIST 3D format: uint8 volumes (N, S, S, S) and uint8 labels (N, 1) per split, as
    ``np.savez_compressed`` writes them. Class ``c`` has a bright cube in its own octant over noise."""
    rng = np.random.default_rng(seed)
    half = size // 2
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        labels = np.arange(n) % n_classes
        rng.shuffle(labels)
        volumes = rng.normal(80, 20, size=(n, size, size, size))
        for i, c in enumerate(labels):
            z, y, x = (int(c) >> 2) & 1, (int(c) >> 1) & 1, int(c) & 1
            volumes[i, z * half:(z + 1) * half, y * half:(y + 1) * half, x * half:(x + 1) * half] += 120
        arrays[f"{split}_images"] = np.clip(volumes, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


#: A tiny open_clip ViT (2 layers, 32 px, 8 px patches: 4 x 4 tokens) in open_clip's config format: an aligned pair that
#: builds and exports in seconds (``open-clip:model=local-dir:<folder>``, with ``pretrained=random`` or a checkpoint).
TINY_CLIP = {"model_cfg": {"embed_dim": 32,
                           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
                           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}}


def tiny_clip_folder(folder: Path) -> Path:
    """``folder`` holding :data:`TINY_CLIP` as its ``open_clip_config.json``."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    return folder


def hica_bench(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed ``hica-bench`` console script as a user would."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TEST_PLUGINS), os.environ.get("PYTHONPATH", "")])}
    full_env.update(env or {})
    exe = Path(sys.executable).parent / "hica-bench"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout)


def majority_plugin(alpha: float = 1.0) -> str:
    """The source of the README's worked example (a third party's method plugin), with the default ``alpha``."""
    return textwrap.dedent('''
        import numpy as np
        from hica_bench import hookimpl
        from hica_bench.interfaces import PluginSpec

        class Majority:
            """Predicts the support set's class frequencies, smoothed by ``alpha``."""
            needs = frozenset({"image_features"})

            def __init__(self, alpha=ALPHA):
                self.alpha = alpha

            def fit(self, task):
                counts = np.bincount(task.support_labels, minlength=task.n_classes) + self.alpha
                self.prior_ = counts / counts.sum()
                return self

            def predict_proba(self, features):
                return np.tile(self.prior_, (len(features), 1))

        @hookimpl
        def hica_bench_methods():
            return [PluginSpec("method", "majority", "class prior of the support set", Majority)]
    ''').replace("ALPHA", repr(alpha))


def invoke(*args) -> tuple[int, str, str]:
    """``hica-bench ARGS`` through the console script's entry point (``hica_bench.cli:main``) in this process: the
    same code as the installed command minus interpreter start-up (an unexpected exception escapes ``main`` and fails
    the test with its traceback). Returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from hica_bench import cli

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["hica-bench", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exited:
            cli.main()
    finally:
        sys.argv = argv
    return exited.value.code, out.getvalue(), err.getvalue()


def prototype_run(medmnist_root: Path, cache: Path, out: Path, seeds: str, *extra) -> None:
    """``hica-bench -p pixel_encoder run`` of prototype at 1 shot on the real BreastMNIST, in this process (a module
    fixture's finished results for the bad-input and hostile-input tests to start from)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TEST_PLUGINS))
        code, _, err = invoke("-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets", "breastmnist", "--methods",
                              "prototype", "--shots", "1", "--seeds", seeds, "--data-root", medmnist_root,
                              "--cache-dir", cache, "--out", out, *extra)
    assert code == 0, err


# --------------------------------------------------------------------------- lanes
#
# Where a test lives says what it needs (pyproject.toml registers the markers; each test gets its lane's marker here):
#   tests/unit          the library on constructed or small inputs, in this process: no CLI run, no subprocess, no
#                       pretrained-encoder pass over a dataset
#   tests/cli           ``hica-bench`` driven in this process through its entry point (``invoke``), tiny test encoders
#   tests/system        real pretrained encoders over real data, Ray, subprocesses and installs, a browser, CPU load
#   plugins/*/tests     tests whose subject is one first-party plugin (any of the above; the heavy ones are ``slow``)
# Tests marked ``serial`` load the CPU or measure throughput: the test command runs them alone, before the rest.

LANES = {("tests", "unit"): "unit", ("tests", "cli"): "cli", ("tests", "system"): "system"}

#: With pytest-xdist (``-n 2``) a test module is one unit of work, run by one worker from start to end (a module fixture
#: runs once). Modules named here share their unit with the others of the same name:
GROUPS = {
    # they start Ray, and tests/system/test_executors.py ends its cluster with `ray stop --force`, which stops every
    # Ray runtime of the machine: never two of them at once
    "tests/system/test_executors.py": "ray",
    "tests/system/test_adapting_system.py": "ray",
    # they share a worker's default-encoder cache (conftest.default_encoder_cache): BreastMNIST encoded once per
    # worker, the extraction settings probed once, HiCA's stage 1 trained once (tests/system/test_explain.py's HiCA
    # cell and plugins/hica/tests/test_hica.py's, which checks there is one entry); two units, so that two workers
    # share the work (each encodes BreastMNIST once)
    "tests/system/test_explain.py": "default-encoder-hica",
    "plugins/hica/tests/test_hica.py": "default-encoder-hica",
    "tests/system/test_cli.py": "default-encoder",
    "tests/system/test_lazy_encoder_system.py": "default-encoder",
    "tests/system/test_tuning_system.py": "default-encoder",
    "tests/cli/test_explain_cli.py": "default-encoder",
}


def lane_of(path: Path) -> str | None:
    parts = path.resolve().relative_to(REPO).parts if path.resolve().is_relative_to(REPO) else ()
    if parts[:1] == ("plugins",) and parts[2:3] == ("tests",):
        return "plugin"
    return LANES.get(parts[:2])


def group_of(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    return GROUPS.get(module, module)


if "PYTEST_XDIST_WORKER" in os.environ:
    # Two workers on two cores: OpenMP threads that wait for work sleep instead of spinning. Spinning, torch's threads
    # burn the core the other worker needs (the unit lane took 85 s of CPU instead of 46 s); the thread count, hence
    # every number and every probe, is unchanged. Set before a test imports torch; the runs a test starts inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_collection_modifyitems(config, items):
    for item in items:
        lane = lane_of(item.path)
        if lane is None:  # benchmarks/ (run on their own): no lane, and no time limit
            if config.pluginmanager.hasplugin("timeout"):
                item.add_marker(pytest.mark.timeout(0))
            continue
        item.add_marker(lane)
    if "PYTEST_XDIST_WORKER" in os.environ:
        # the longest units first, so that no worker starts one late while the other idles: the named groups, then
        # the modules holding slow tests, then the rest; each module keeps its own order (every worker sorts alike)
        slow = {group_of(item.nodeid) for item in items if item.get_closest_marker("slow")}
        rank = {"default-encoder-hica": 0, "default-encoder": 0, "ray": 1}
        items.sort(key=lambda item: rank.get(group_of(item.nodeid), 2 if group_of(item.nodeid) in slow else 3))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without it, nothing to schedule
def pytest_xdist_make_scheduler(config, log):
    """Work units for pytest-xdist: a module, or a group of modules from :data:`GROUPS`, in the order collected. (The
    ``xdist_group`` mark does the like through ``--dist loadgroup``, but on pytest 9 it no longer groups: xdist issue
    1386.)"""
    if config.getvalue("dist") not in ("load", "loadscope", "loadfile", "loadgroup"):
        return None  # --dist each / worksteal: xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    config.option.loadscopereorder = False  # keep the collected order (see pytest_collection_modifyitems)
    return ModuleGroups(config, log)
