"""Scaling out through the CLI in this process: ``--shard I/N`` with ``hica-bench merge``, and executor flags that are
one line (split from tests/system/test_executors.py, whose helpers and in-process reference run it uses)."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from conftest import invoke
from test_executors import free_port, computed, reference, run_in_process  # noqa: F401  (reference: a module fixture)


def test_shards_partition_the_grid_and_merge_to_the_unsharded_run(reference, medmnist_root, tmp_path):
    base, expected = reference
    for index in (0, 1):
        code, out, err = run_in_process(medmnist_root, base / "cache", tmp_path / "sharded", "--shard", f"{index}/2")
        assert code == 0, err
        assert f"(shard {index}/2; 12 in the other shards)" in " ".join(out.split())
    shards = [computed(tmp_path / "sharded" / f"shard-{i}-of-2" / "results.jsonl") for i in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 12 and not set(shards[0]) & set(shards[1])  # each cell in one shard
    code, out, err = invoke("merge", tmp_path / "sharded" / "shard-0-of-2", tmp_path / "sharded" / "shard-1-of-2",
                            "--out", tmp_path / "sharded", "--no-report")
    assert code == 0, err
    assert "24 cells (0 duplicate records dropped)" in out
    assert computed(tmp_path / "sharded" / "results.jsonl") == expected
    assert (tmp_path / "sharded" / "leaderboard.md").is_file()
    # a shard rerun finds its cells finished; the same records twice are one cell each
    code, out, err = run_in_process(medmnist_root, base / "cache", tmp_path / "sharded", "--shard", "1/2")
    assert code == 0 and "12 already finished" in " ".join(out.split()), err
    shutil.copytree(tmp_path / "sharded" / "shard-0-of-2", tmp_path / "copy")
    code, out, err = invoke("merge", tmp_path / "sharded" / "shard-0-of-2", tmp_path / "sharded" / "shard-1-of-2",
                            tmp_path / "copy", "--out", tmp_path / "again", "--no-report")
    assert code == 0 and "24 cells (12 duplicate records dropped)" in out, err
    assert computed(tmp_path / "again" / "results.jsonl") == expected


def test_merge_refuses_two_different_results_for_one_cell(reference, tmp_path):
    base, _ = reference
    lines = (base / "in-process" / "results.jsonl").read_text().splitlines()
    changed = json.loads(lines[0])
    changed["metrics"]["acc"] = 1.0
    (tmp_path / "a.jsonl").write_text(lines[0] + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(changed) + "\n")
    code, out, err = invoke("merge", tmp_path / "a.jsonl", tmp_path / "b.jsonl", "--out", tmp_path / "m")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "has different results in" in err and "a.jsonl" in err and "b.jsonl" in err
    assert not (tmp_path / "m" / "results.jsonl").exists()


@pytest.mark.parametrize("args, message", [
    (["--shard", "2/2"], "--shard 2/2: I must be 0 to N-1"),
    (["--shard", "one/2"], "--shard takes I/N"),
    (["--workers", "2"], "--workers needs --executor ray"),
    (["--ray-address", "auto"], "--ray-address needs --executor ray"),
    (["--executor", "dask"], "--executor must be in-process or ray"),
    (["--executor", "ray", "--workers", "0"], "--workers must be >= 1"),
])
def test_bad_executor_flags_are_one_line(args, message, reference, medmnist_root, tmp_path):
    base, _ = reference
    code, _, err = run_in_process(medmnist_root, base / "cache", tmp_path / "out", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_an_address_nothing_listens_on_is_one_line(reference, medmnist_root, tmp_path):
    base, _ = reference
    start = time.perf_counter()
    code, _, err = run_in_process(medmnist_root, base / "cache", tmp_path / "out", "--executor", "ray",
                                  "--ray-address", f"127.0.0.1:{free_port()}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nothing answers there" in err, err
    assert time.perf_counter() - start < 60  # Ray alone would retry for minutes


def test_a_ray_worker_rebuilds_a_transfer_from_its_two_datasets(medmnist_root, tmp_path):
    """What a Ray worker does with a cross-dataset cell's dataset reference (the transfer's target, with its source and
    class matching): it builds both datasets and the transfer, whose identity must be the driver's; a different class
    matching is another transfer, refused as other contents."""
    import dataclasses

    import numpy as np

    from hica_bench import executors
    from hica_bench.errors import UserError
    from hica_bench.registry import load_registry
    from hica_bench.transfer import TransferDataset

    registry = load_registry()
    source, target = (registry.choose("dataset", name) for name in ("pneumoniamnist", "breastmnist"))
    build = dict(root=str(medmnist_root), size=28, download=False, cache_dir=tmp_path)
    driver = TransferDataset(source.build(**build), target.build(**build), np.array([1, 0]), source.label, target.label)
    context = executors.WorkerContext(registry.recipe, str(medmnist_root), str(tmp_path), "cpu", 28, None)
    ref = dataclasses.replace(executors.ChoiceRef.of(target), source=executors.ChoiceRef.of(source), class_map=(1, 0))
    rebuilt = executors.worker_dataset(context, ref, driver.identity)
    assert isinstance(rebuilt, TransferDataset) and rebuilt.identity == driver.identity
    assert np.array_equal(rebuilt.split("train").labels, 1 - source.build(**build).split("train").labels)
    assert np.array_equal(rebuilt.split("test").labels, driver.target.split("test").labels)
    with pytest.raises(UserError, match="has other contents there"):
        executors.worker_dataset(context, dataclasses.replace(ref, class_map=(0, 1)), driver.identity)
