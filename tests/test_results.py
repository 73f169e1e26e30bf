import json

import pytest

from hica_bench.errors import UserError
from hica_bench.results import SCHEMA_VERSION, CellKey, CellResult, ResultsStore


def _result(seed, acc=0.5):
    return CellResult(CellKey("breastmnist", 28, "prototype", "pixels", 5, seed), "ok", metrics={"acc": acc})


def test_truncated_last_line_is_skipped_and_the_next_append_starts_afresh(tmp_path):
    store = ResultsStore(tmp_path / "results.jsonl")
    store.append(_result(0))
    line = _result(1).to_json()
    with store.path.open("a") as handle:  # a write killed half-way
        handle.write(line[: len(line) // 2])
    assert set(store.load()) == {_result(0).key.id}
    store.append(_result(2))
    loaded = store.load()
    assert set(loaded) == {_result(0).key.id, _result(2).key.id}
    assert loaded[_result(2).key.id].metrics == {"acc": 0.5}


def test_newer_schema_is_refused(tmp_path):
    store = ResultsStore(tmp_path / "results.jsonl")
    record = json.loads(_result(0).to_json())
    record["schema_version"] = SCHEMA_VERSION + 1
    store.path.write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match="newer hica-bench"):
        store.load()


def test_cell_id_depends_on_every_key_field():
    ids = {CellKey("d", 28, "m", "e", 5, 0).id, CellKey("d", 28, "m", "e", 5, 1).id, CellKey("d", 28, "m", "e", 1, 0).id,
           CellKey("d", 64, "m", "e", 5, 0).id, CellKey("d", 28, "m", "e", 5, 0, max_test=10).id}
    assert len(ids) == 5
