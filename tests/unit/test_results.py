import dataclasses
import json
from pathlib import Path

import pytest

from hica_bench import leaderboard
from hica_bench.errors import UserError
from hica_bench.files import digest
from hica_bench.results import (SCHEMA_VERSION, CellKey, CellResult, Component, Identity, Metrics, Origin, ResultsStore,
                                Status, Timings, jsonable, origin_differences)

FEATURES = {"encoder": "test-pixels-16px-v1", "preprocessing": "p", "precision": "fp32", "backend": "eager", "device": "cpu"}
ORIGIN = Origin(
    harness="0.1.0", dataset=Component("dataset", "breastmnist", {}, "hica-bench-medmnist", "0.1.0"),
    dataset_identity="medmnist/breastmnist@28/sha256:abc", size=28, max_test=None,
    encoder=Component("encoder", "pixels", {}, "-p pixel_encoder", "?"), features=FEATURES, text_encoder=None,
    method=Component("method", "prototype", {"temperature": 0.05}, "hica-bench-baselines", "0.1.0"),
    method_components=(), device="cpu")


def _result(seed, acc=0.5, origin=ORIGIN):
    key = CellKey("breastmnist", 28, "prototype", "pixels", 5, seed)
    return CellResult(key, Identity(origin, 5, seed, f"support-{seed}"), Status.OK,
                      metrics=Metrics(acc=acc, auc=0.5, f1_macro=0.5, balanced_acc=0.5), timings=Timings(fit_s=0.1))


def test_truncated_last_line_is_skipped_and_the_next_append_starts_afresh(tmp_path):
    store = ResultsStore(tmp_path / "results.jsonl")
    store.append(_result(0))
    line = _result(1).to_json()
    with store.path.open("a") as handle:  # a write killed half-way
        handle.write(line[: len(line) // 2])
    assert set(store.load()) == {_result(0).cell_id}
    store.append(_result(2))
    loaded = store.load()
    assert set(loaded) == {_result(0).cell_id, _result(2).cell_id}
    assert loaded[_result(2).cell_id].metrics.acc == 0.5


def test_a_record_round_trips_typed(tmp_path):
    store = ResultsStore(tmp_path / "results.jsonl")
    original = _result(3, acc=0.75)
    store.append(original)
    (loaded,) = store.load().values()
    assert loaded.status is Status.OK and isinstance(loaded.metrics, Metrics) and loaded.metrics.acc == 0.75
    assert loaded.identity == original.identity and loaded.cell_id == original.cell_id
    assert loaded.timings.fit_s == 0.1 and loaded.timings.efficiency is None
    record = json.loads(store.path.read_text())
    assert record["cell_id"] == original.cell_id and record["origin_id"] == ORIGIN.id
    assert record["status"] == "ok" and record["schema_version"] == SCHEMA_VERSION == 11


def test_newer_schema_is_refused(tmp_path):
    store = ResultsStore(tmp_path / "results.jsonl")
    record = json.loads(_result(0).to_json())
    record["schema_version"] = SCHEMA_VERSION + 1
    store.path.write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match="newer hica-bench"):
        store.load()


def test_a_record_that_does_not_match_its_schema_names_its_line(tmp_path):
    store = ResultsStore(tmp_path / "results.jsonl")
    store.append(_result(0))
    record = json.loads(_result(1).to_json())
    del record["identity"]
    with store.path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    with pytest.raises(UserError, match=r"results.jsonl:2 does not match result schema 11"):
        store.load()


def test_every_part_of_the_identity_changes_the_cell_id():
    base = _result(0).identity
    changed = [
        dataclasses.replace(base, seed=1), dataclasses.replace(base, k=1), dataclasses.replace(base, support="other"),
        dataclasses.replace(base, origin=dataclasses.replace(ORIGIN, dataset_identity="medmnist/breastmnist@28/sha256:def")),
        dataclasses.replace(base, origin=dataclasses.replace(ORIGIN, features={**FEATURES, "backend": "onnxruntime"})),
        dataclasses.replace(base, origin=dataclasses.replace(ORIGIN, features={**FEATURES, "encoder": "sha256=new"})),
        dataclasses.replace(base, origin=dataclasses.replace(ORIGIN, method=dataclasses.replace(ORIGIN.method, version="0.2.0"))),
        dataclasses.replace(base, origin=dataclasses.replace(ORIGIN, method=dataclasses.replace(
            ORIGIN.method, options={"temperature": 0.1}))),
        dataclasses.replace(base, origin=dataclasses.replace(ORIGIN, device="cuda")),
        dataclasses.replace(base, origin=dataclasses.replace(ORIGIN, harness="0.2.0")),
    ]
    assert len({base.id} | {identity.id for identity in changed}) == len(changed) + 1
    origins = [identity.origin.id for identity in changed[3:]]
    assert len(set(origins)) == len(origins) and ORIGIN.id not in origins
    assert {identity.origin.id for identity in changed[:3]} == {ORIGIN.id}  # k, seed and support are not the origin


def test_origin_differences_name_what_changed():
    other = dataclasses.replace(ORIGIN, features={**FEATURES, "backend": "onnxruntime"},
                                method=dataclasses.replace(ORIGIN.method, version="0.2.0"))
    assert origin_differences(ORIGIN, other) == ["features.backend: eager → onnxruntime", "method.version: 0.1.0 → 0.2.0"]
    assert origin_differences(ORIGIN, ORIGIN) == []


V1_RECORD = {
    "cell_id": "62b83678d0c8daba3431", "finished_at": "2026-11-24T00:09:38+00:00",
    "environment": {"cpu_count": 2, "cpu_model": "AMD EPYC", "device": "cpu", "device_name": "AMD EPYC",
                    "extraction": {"backend": "onnxruntime", "batch_size": 8}, "git": "8ce57ad", "packages": {}, "platform": "x",
                    "python": "3.11.7", "torch_threads": 2},
    "key": {"dataset": "breastmnist", "encoder": "pixels", "k": 5, "max_test": None, "method": "prototype", "seed": 0, "size": 28},
    "metrics": {"acc": 0.6, "auc": 0.7, "balanced_acc": 0.55, "f1_macro": 0.5}, "n_support": 10, "n_test": 156,
    "options": {"encoder": {}, "method": {"temperature": 0.05}, "fit": {"C": 1.0}}, "reason": None, "schema_version": 1,
    "status": "ok", "support_hash": "4057a2bc", "timings": {"encoder_images_per_s": 150.0, "fit_s": 0.01},
}


def test_a_version_1_file_opens_as_legacy_and_is_never_mixed(tmp_path):
    """A schema-1 results file (as every committed leaderboard before schema 2) still opens: its records are legacy,
    with their label, metrics and timings; a schema-2 result of the same label is another origin, never averaged."""
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(V1_RECORD) + "\n" + json.dumps({**V1_RECORD, "key": {**V1_RECORD["key"], "seed": 1}}) + "\n")
    store = ResultsStore(path)
    legacy = list(store.load().values())
    assert len(legacy) == 2 and all(r.identity is None and r.origin_id == "legacy" for r in legacy)
    assert legacy[0].metrics.acc == 0.6 and legacy[0].fit_info == {"C": 1.0} and legacy[0].support_hash == "4057a2bc"
    assert legacy[0].timings.encoder_images_per_s == 150.0 and legacy[0].environment.extraction["backend"] == "onnxruntime"
    assert legacy[0].cell_id != legacy[1].cell_id and legacy[0].schema_version == 1

    store.append(_result(0, acc=0.9))  # a new result of the same label, appended to the old file
    board = leaderboard.markdown(list(store.load().values()))
    assert "| prototype ⟨legacy⟩" in board and f"| prototype ⟨{ORIGIN.id}⟩" in board
    assert "60.0 ± 0.0 (2)" in board and "90.0 (1)" in board  # each origin on its own row
    assert "legacy: schema-1 results, origin not recorded" in board
    assert path.read_text().splitlines()[0] == json.dumps(V1_RECORD)  # the old records are kept as they were


def test_values_a_plugin_hands_over_are_written_not_crashed_on(tmp_path):
    """fit_info_ and component options come from plugins: numpy numbers are written as numbers, anything else as its
    repr, so a finished cell is always recorded (a TypeError here would end the run after the cell's work)."""
    import numpy as np

    result = _result(0)
    result.fit_info = {"C": np.float32(0.5), "steps": np.int64(3), "curve": np.arange(3), "model": object()}
    result.components_used = [Component("descriptor-generator", "noisy", {"base": object(), "fraction": np.float64(0.3)},
                                        "hica-bench-hica", "0.1.0")]
    store = ResultsStore(tmp_path / "results.jsonl")
    store.append(result)
    (loaded,) = store.load().values()
    assert loaded.fit_info["C"] == 0.5 and loaded.fit_info["steps"] == 3 and loaded.fit_info["curve"] == [0, 1, 2]
    assert loaded.fit_info["model"].startswith("<object object at")
    assert loaded.components_used[0].options["fraction"] == 0.3 and loaded.cell_id == result.cell_id


def _written_by_schema(version: int, tmp_path: Path) -> tuple[dict, Path]:
    """A record as schema ``version`` (2 to 9) wrote it, in a results file of its own: (record, path)."""
    record = json.loads(_result(0).to_json())
    del record["multilabel"], record["identity"]["origin"]["support_from"]
    if version == 9:
        record["schema_version"] = version
        path = tmp_path / "results.jsonl"
        path.write_text(json.dumps(record) + "\n")
        return record, path
    del record["novel"]
    if version == 8:
        record["schema_version"] = version
        path = tmp_path / "results.jsonl"
        path.write_text(json.dumps(record) + "\n")
        return record, path
    del record["key"]["protocol"], record["identity"]["origin"]["protocol"], record["identity"]["validation"]
    if version == 7:
        record["schema_version"] = version
        path = tmp_path / "results.jsonl"
        path.write_text(json.dumps(record) + "\n")
        return record, path
    del record["key"]["corruption"], record["key"]["severity"], record["identity"]["origin"]["corruption"]
    if version == 6:
        record["schema_version"] = version
        path = tmp_path / "results.jsonl"
        path.write_text(json.dumps(record) + "\n")
        return record, path
    del record["adapted_encoder"], record["timings"]["adapted_encode_s"], record["timings"]["adapted_images_per_s"]
    if version == 5:
        record["schema_version"] = version
        path = tmp_path / "results.jsonl"
        path.write_text(json.dumps(record) + "\n")
        return record, path
    del record["identity"]["origin"]["prompts"]  # before prompt files
    if version == 2:  # before per-class scores and saved predictions
        del record["per_class"], record["predictions"]
    for name in ("paired_efficiency", "efficiency_spread", "cpu_contention"):  # before the paired throughput
        if version < 4:
            del record["timings"][name]
    record["schema_version"] = version
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(record) + "\n")
    return record, path


def test_a_schema_2_record_reads_without_per_class_scores(tmp_path):
    """Schema 2 (the first with identities) had no per-class scores or saved predictions: read as None, same cell."""
    _, path = _written_by_schema(2, tmp_path)
    (loaded,) = ResultsStore(path).load().values()
    assert loaded.per_class is None and loaded.predictions is None and loaded.cell_id == _result(0).cell_id
    assert loaded.schema_version == 2 and loaded.metrics.acc == 0.5


def test_a_schema_4_record_reads_without_a_prompt_file_and_keeps_its_cell_id(tmp_path):
    """Schema 4 had no prompt files: read with ``prompts`` None, and an origin without one keeps its old id (so
    committed baselines and resumable results stay valid); a prompt file's digest makes another origin."""
    record, path = _written_by_schema(4, tmp_path)
    (loaded,) = ResultsStore(path).load().values()
    assert loaded.identity.origin.prompts is None and loaded.cell_id == _result(0).cell_id
    origin = loaded.identity.origin
    fields_ = {f.name: getattr(origin, f.name) for f in dataclasses.fields(origin)}
    assert origin.id == digest({k: v for k, v in jsonable(fields_).items() if k not in ("prompts", "corruption", "protocol", "support_from")}, 12)
    assert dataclasses.replace(origin, prompts="ab" * 32).id != origin.id


def test_a_schema_5_record_reads_without_an_adapted_encoder(tmp_path):
    """Schema 5 had no methods that adapt the encoder: read with ``adapted_encoder`` and its timings None, same cell;
    the same record claiming schema 6 lacks a field it must have."""
    record, path = _written_by_schema(5, tmp_path)
    (loaded,) = ResultsStore(path).load().values()
    assert loaded.adapted_encoder is None and loaded.timings.adapted_encode_s is None
    assert loaded.cell_id == _result(0).cell_id and loaded.schema_version == 5
    record["schema_version"] = 6
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match="missing field (adapted_encoder|timings.adapted_encode_s)"):
        ResultsStore(path).load()


def test_a_schema_9_record_reads_as_single_label_and_in_domain(tmp_path):
    """Schema 9 had no multi-label datasets and no cross-dataset cells: read with ``multilabel`` and
    ``origin.support_from`` None, the same cell id; the same record claiming schema 10 lacks them."""
    record, path = _written_by_schema(9, tmp_path)
    (loaded,) = ResultsStore(path).load().values()
    assert loaded.multilabel is None and loaded.identity.origin.support_from is None
    assert loaded.cell_id == _result(0).cell_id and loaded.schema_version == 9
    record["schema_version"] = 10
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match="missing field (multilabel|identity)"):
        ResultsStore(path).load()


def test_a_schema_8_record_reads_without_novel_classes(tmp_path):
    """Schema 8 had no base-to-novel: read with ``novel`` None and the same cell id; claiming schema 9 it lacks it."""
    record, path = _written_by_schema(8, tmp_path)
    (loaded,) = ResultsStore(path).load().values()
    assert loaded.novel is None and loaded.cell_id == _result(0).cell_id and loaded.schema_version == 8
    record["schema_version"] = 9
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match="missing field novel"):
        ResultsStore(path).load()


def test_a_schema_7_record_reads_as_a_plain_few_shot_cell(tmp_path):
    """Schema 7 had no protocols: read with ``key.protocol`` few-shot, no protocol in the origin and no validation set,
    the same cell id; the same record claiming schema 8 lacks the fields it must have."""
    record, path = _written_by_schema(7, tmp_path)
    (loaded,) = ResultsStore(path).load().values()
    assert loaded.key.protocol == "few-shot" and loaded.identity.origin.protocol is None
    assert loaded.identity.validation is None and loaded.cell_id == _result(0).cell_id and loaded.schema_version == 7
    record["schema_version"] = 8
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match="missing field (key.protocol|identity.validation|identity.origin.protocol)"):
        ResultsStore(path).load()


def test_a_schema_6_record_reads_as_a_clean_cell(tmp_path):
    """Schema 6 had no corruption track: read with ``key.corruption``/``severity`` and ``origin.corruption`` None, the
    same cell id; the same record claiming schema 7 lacks the fields it must have."""
    record, path = _written_by_schema(6, tmp_path)
    (loaded,) = ResultsStore(path).load().values()
    assert loaded.key.corruption is None and loaded.key.severity is None and loaded.identity.origin.corruption is None
    assert loaded.cell_id == _result(0).cell_id and loaded.schema_version == 6
    record["schema_version"] = 7
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match="missing field (key.corruption|identity.origin.corruption)"):
        ResultsStore(path).load()


def test_a_schema_3_record_reads_without_the_paired_throughput(tmp_path):
    """Schema 3 had per-class scores but not the paired efficiency, its spread or the CPU contention: read as None."""
    record, path = _written_by_schema(3, tmp_path)
    (loaded,) = ResultsStore(path).load().values()
    assert loaded.timings.paired_efficiency is None and loaded.timings.cpu_contention is None
    assert loaded.cell_id == _result(0).cell_id and loaded.schema_version == 3
    record["schema_version"] = 4  # the same record claiming schema 4 lacks fields it must have
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match="missing field timings.paired_efficiency"):
        ResultsStore(path).load()


def test_without_a_prompt_file_ids_are_computed_as_before_prompt_files():
    """Schema-4 files store ``cell_id`` and ``origin_id`` as digests of identities without ``prompts``: an identity
    without a prompt file must give the same digests, so ids stored in older files and prediction file names stay valid."""
    identity = _result(0).identity
    old = jsonable(identity)
    del old["origin"]["prompts"], old["origin"]["corruption"], old["origin"]["protocol"], old["validation"]
    del old["origin"]["support_from"]
    assert identity.id == digest(old, 20) and identity.origin.id == digest(old["origin"], 12)
    with_file = Identity(dataclasses.replace(identity.origin, prompts="cd" * 32), identity.k, identity.seed, identity.support)
    assert with_file.id != identity.id


def test_a_protocol_and_a_validation_set_are_part_of_the_identity_and_their_absence_changes_nothing():
    """A cell of a selecting protocol has the protocol in its origin and its validation set beside its support; a
    plain few-shot cell has neither, so its ids are those of schema 7 (checked above)."""
    base = _result(0).identity
    protocol = Component("protocol", "few-shot-val", {"per_class": 0, "source": "auto", "metric": "balanced_acc"},
                         "hica-bench-protocols", "0.1.0")
    tuned = dataclasses.replace(base, origin=dataclasses.replace(ORIGIN, protocol=protocol))
    validated = dataclasses.replace(tuned, validation="val:" + "ab" * 32)
    other = dataclasses.replace(validated, validation="train:" + "ab" * 32)
    assert len({base.id, tuned.id, validated.id, other.id}) == 4
    assert tuned.origin.id != ORIGIN.id and validated.origin.id == tuned.origin.id  # the validation set is per cell
    assert "protocol" not in base.origin.identifying() and "protocol" in tuned.origin.identifying()
    transfer = dataclasses.replace(tuned, origin=dataclasses.replace(tuned.origin, support_from={
        "dataset": "pneumoniamnist", "identity": "ef" * 32, "classes": [0, 1]}))
    assert "support_from" not in tuned.origin.identifying() and transfer.id != tuned.id
