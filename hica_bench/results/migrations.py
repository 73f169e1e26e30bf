"""Records of older result schemas upgraded to the current one's shape, one step per schema version, before they are
read (:meth:`hica_bench.results.CellResult.from_record`). Schema 1 (no identity) is read as a legacy result there."""

from __future__ import annotations

from typing import Any


def upgrade(record: dict[str, Any]) -> dict[str, Any]:
    """A parsed record of schema 2 to 10 in the shape of the current schema (11): the fields later schemas added are
    filled with what they mean for an older record (none, or clean)."""
    if record.get("schema_version") == 2:  # before per-class scores and saved predictions
        record = {"per_class": None, "predictions": None, **record}
    if record.get("schema_version") in (2, 3) and isinstance(record.get("timings"), dict):  # before paired timing
        record["timings"] = {"paired_efficiency": None, "efficiency_spread": None, "cpu_contention": None,
                             **record["timings"]}
    if record.get("schema_version") in (2, 3, 4):  # before prompt files and calibration
        record = {"calibration": None, **record}
        if isinstance(record.get("identity"), dict) and isinstance(record["identity"].get("origin"), dict):
            record["identity"] = {**record["identity"], "origin": {"prompts": None, **record["identity"]["origin"]}}
        if isinstance(record.get("metrics"), dict):
            record["metrics"] = {"ece": None, **record["metrics"]}
    if record.get("schema_version") in (2, 3, 4, 5):  # before methods that adapt the encoder
        record = {"adapted_encoder": None, **record}
        if isinstance(record.get("timings"), dict):
            record["timings"] = {"adapted_encode_s": None, "adapted_images_per_s": None, **record["timings"]}
    if record.get("schema_version") in (2, 3, 4, 5, 6):  # before the corruption track: clean cells
        if isinstance(record.get("key"), dict):
            record["key"] = {**record["key"], "corruption": None, "severity": None}
        if isinstance(record.get("identity"), dict) and isinstance(record["identity"].get("origin"), dict):
            record["identity"] = {**record["identity"], "origin": {"corruption": None, **record["identity"]["origin"]}}
    if record.get("schema_version") in (2, 3, 4, 5, 6, 7):  # before protocols: every cell was a plain few-shot one
        if isinstance(record.get("key"), dict):
            record["key"] = {**record["key"], "protocol": "few-shot"}
        if isinstance(record.get("identity"), dict):
            identity = {**record["identity"], "validation": None}
            if isinstance(identity.get("origin"), dict):
                identity["origin"] = {**identity["origin"], "protocol": None}
            record["identity"] = identity
    if record.get("schema_version") in (2, 3, 4, 5, 6, 7, 8):  # before base-to-novel: no novel classes
        record = {**record, "novel": None}
    if record.get("schema_version") in (2, 3, 4, 5, 6, 7, 8, 9):  # before multi-label datasets and cross-dataset cells
        record = {**record, "multilabel": None}
        if isinstance(record.get("identity"), dict) and isinstance(record["identity"].get("origin"), dict):
            record["identity"] = {**record["identity"], "origin": {**record["identity"]["origin"], "support_from": None}}
    if record.get("schema_version") in (2, 3, 4, 5, 6, 7, 8, 9, 10):  # before the commit's time was recorded
        if isinstance(record.get("environment"), dict):
            record["environment"] = {**record["environment"], "git_time": None}
    return record
