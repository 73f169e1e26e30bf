"""Generated cases of issue 31's first class (finished results lost): whatever a plugin puts in ``fit_info_``, the
record the store appends reads back; and however records of one grid are spread over files (duplicates, failed
attempts, a --force history in the target), a merge keeps every cell, lets a finished record beat a failed one,
only appends to a target that is one of its inputs, and counts every record it leaves out."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hica_bench.results import (CellKey, CellResult, Component, Identity, Metrics, Origin, ResultsStore, Status,
                                merge_shards)

FAST = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ORIGIN = Origin(
    harness="0.1.0", dataset=Component("dataset", "breastmnist", {}, "hica-bench-medmnist", "0.1.0"),
    dataset_identity="medmnist/breastmnist@28/sha256:abc", size=28, max_test=None,
    encoder=Component("encoder", "pixels", {}, "-p pixel_encoder", "?"),
    features={"encoder": "e", "preprocessing": "p", "precision": "fp32", "backend": "eager", "device": "cpu"},
    text_encoder=None, method=Component("method", "prototype", {}, "hica-bench-baselines", "0.1.0"),
    method_components=(), device="cpu")


def result(seed: int, status: Status = Status.OK, acc: float = 0.5, fit_info=None) -> CellResult:
    key = CellKey("breastmnist", 28, "prototype", "pixels", 1, seed)
    finished = status is Status.OK
    return CellResult(key, Identity(ORIGIN, 1, seed, f"support-{seed}"), status,
                      metrics=Metrics(acc=acc, auc=0.5, f1_macro=0.5, balanced_acc=0.5) if finished else None,
                      reason=None if finished else "boom", fit_info=fit_info)


class Opaque:
    def __repr__(self):
        raise RuntimeError("no repr")


leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=20), st.binary(max_size=8), st.builds(Opaque),
                   st.builds(lambda n: np.arange(n, dtype=np.float32), st.integers(0, 4)),
                   st.builds(np.int64, st.integers(-5, 5)), st.builds(chr, st.integers(0xD800, 0xDFFF)))  # lone surrogates
values = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.tuples(inner, inner), st.frozensets(st.integers(), max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=5), st.integers(), st.tuples(st.integers())), inner, max_size=3)),
    max_leaves=12)


@FAST
@given(fit_info=st.dictionaries(st.text(max_size=5), values, max_size=4), depth=st.integers(0, 3000))
def test_whatever_fit_info_holds_the_appended_record_reads_back(tmp_path_factory, fit_info, depth):
    store = ResultsStore(tmp_path_factory.mktemp("store") / "results.jsonl")
    nested = inner = {}
    for _ in range(depth):
        inner["x"] = {}
        inner = inner["x"]
    store.append(result(0, fit_info={**fit_info, "nested": nested}))
    (loaded,) = store.load().values()
    assert loaded.status is Status.OK and loaded.metrics.acc == 0.5 and isinstance(loaded.fit_info, dict)


@FAST
@given(variant=st.sampled_from(["failed with metrics", "ok without metrics", "n_test as text", "n_support as a fraction"]))
def test_a_record_that_would_not_read_back_is_written_as_the_cells_failure(tmp_path_factory, variant):
    """A record the schema cannot read back (what a failure after scoring used to write, a plugin's odd values) is
    written as the cell's failure instead, and the file stays readable."""
    store = ResultsStore(tmp_path_factory.mktemp("store") / "results.jsonl")
    store.append(result(0))
    broken = {"failed with metrics": lambda r: dataclasses.replace(r, status=Status.FAILED, reason="boom"),
              "ok without metrics": lambda r: dataclasses.replace(r, metrics=None),
              "n_test as text": lambda r: dataclasses.replace(r, status=Status.FAILED, metrics=None, n_test="many"),
              "n_support as a fraction": lambda r: dataclasses.replace(r, n_support=-1.5)}[variant](result(1))
    store.append(broken)
    loaded = store.load()
    assert len(loaded) == 2 and loaded[broken.cell_id].status is Status.FAILED
    assert loaded[broken.cell_id].metrics is None and "could not be written as it was" in loaded[broken.cell_id].reason


@FAST
@given(name=st.sampled_from(["acc", "auc", "f1_macro", "balanced_acc", "ece"]),
       value=st.sampled_from([math.inf, -math.inf, 7.5, -3.0, math.nan, 1.0000001]))
def test_metrics_outside_0_1_are_refused_where_they_are_read(name, value):
    """A record claiming ACC = Infinity or 7.5, AUC = -3 is not published: the schema refuses it (NaN AUC alone is
    allowed: one class evaluated)."""
    values = {"acc": 0.5, "auc": 0.5, "f1_macro": 0.5, "balanced_acc": 0.5, "ece": 0.1, name: value}
    if name == "auc" and math.isnan(value):
        assert math.isnan(Metrics(**values).auc)
        return
    with pytest.raises(ValueError, match=f"metrics.{name}"):
        Metrics(**values)


# a cell's records: its seed, and for each file a list of attempts (failed or ok) written there in order
spread = st.lists(st.tuples(st.integers(0, 7), st.integers(0, 3), st.booleans()), min_size=1, max_size=25)


@FAST
@given(records=spread, target_index=st.sampled_from([None, 0]))
def test_a_merge_keeps_every_cell_and_only_appends_to_its_target(tmp_path_factory, records, target_index):
    root = tmp_path_factory.mktemp("merge")
    out = root / "out"
    files = [root / f"part-{i}" / "results.jsonl" for i in range(4)]
    if target_index is not None:
        files[target_index] = out / "results.jsonl"
    for seed, index, finished in records:
        ResultsStore(files[index]).append(result(seed, Status.OK if finished else Status.FAILED))
    given = [f for f in files if f.exists()]
    before = (out / "results.jsonl").read_bytes() if (out / "results.jsonl").exists() else b""
    loaded = sum(len(ResultsStore(f).load()) for f in given)
    merged = merge_shards(given, out)
    (out / "results.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text(merged.text)
    after = ResultsStore(out / "results.jsonl").load()
    seeds = {seed for seed, _, _ in records}
    assert {r.key.seed for r in after.values()} == seeds  # no cell lost
    newest = {(seed, index): ok for seed, index, ok in records}  # in each file a cell's newest record counts
    finished = {seed for (seed, _), ok in newest.items() if ok}
    assert {r.key.seed for r in after.values() if r.status is Status.OK} == finished  # finished beats failed
    assert (out / "results.jsonl").read_bytes().startswith(before)  # the target is only appended to
    assert len(merged.results) + sum(merged.dropped.values()) == loaded  # every record left out is counted
