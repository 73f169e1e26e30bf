"""Results: the typed, versioned record of one cell (:mod:`.schema`), its JSON codec (:mod:`.codec`) and the upgrade
of older schemas (:mod:`.migrations`), and the JSONL store with its lock, reading several files and merging shards
(:mod:`.store`). The names below are the package's public face; import them from ``hica_bench.results``."""

from hica_bench.results.codec import jsonable
from hica_bench.results.schema import (LEGACY, SCHEMA_VERSION, Calibration, CellKey, CellResult, Component,
                                       Environment, Identity, Metrics, MultiLabelScore, NovelScore, Origin, PerClass, Status, Timings,
                                       flatten, origin_differences)
from hica_bench.results.store import (OUTCOME, Merged, ResultsStore, merge_shards, out_lock, read_many, read_many_with_files,
                                      results_files)

__all__ = ["LEGACY", "Merged", "OUTCOME", "SCHEMA_VERSION", "Calibration", "CellKey", "CellResult", "Component", "Environment",
           "Identity", "Metrics", "MultiLabelScore", "NovelScore", "Origin", "PerClass", "ResultsStore", "Status", "Timings", "jsonable",
           "flatten", "merge_shards", "origin_differences", "out_lock", "read_many", "read_many_with_files", "results_files"]
