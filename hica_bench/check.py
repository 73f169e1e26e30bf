"""``hica-bench check``: compare a fresh run with a committed baseline, cell by cell (a CI regression gate).

Either side is a ``results.jsonl``, a ``leaderboard.csv`` or a folder holding one. A cell is
(dataset, size, encoder, method, k, max_test, the test split's corruption and severity if any, and the protocol); its scores are
means over the seeds both results files hold (a leaderboard CSV gives its recorded means). Where one side holds results of several origins for a cell (see
:class:`hica_bench.results.Origin`), the newest origin is compared and a note says so; where the two sides'
origins differ (another backend, checkpoint, plugin version or option default), a note says what differs.

- **ACC / AUC** regress when the run's mean is more than ``bound`` percentage points below the baseline's:
  ``bound = tolerance``, or with ``noise_z`` > 0, ``max(tolerance, noise_z · std_baseline · √(1/n_b + 1/n_r))``
  (the seed noise of a difference of means). A rise beyond the bound is reported as an improvement.
  A cell that was ok and is now failed or not applicable, or that now fails, is a regression.
- **Throughput** is compared per dataset as *harness efficiency* = encoder images/s ÷ the plain eager forward's
  ``reference_images_per_s`` the same run measured on the same machine (``encoder.encode`` on a preprocessed batch,
  no tuning), so it does not depend on the machine but does catch a slower backend, batch size or data path.
  Where both sides recorded it (schema 4), the efficiency is the median of the extraction's interleaved pairs
  (the harness rate just before each yardstick pass ÷ that pass), so both halves of each ratio saw the same load.
  It regresses when it falls by more than its bound: the larger of ``throughput_tolerance`` and the runs' own noise
  (:func:`paired_noise`: two standard errors of the difference of the two medians, from each side's interquartile
  range of its pairs); when other processes used a share ``c`` >= :data:`BUSY` of the machine's CPUs during either
  side's extraction, it widens further to ``1 - (1 - bound)(1 - c)`` (a run that lost ``c`` of the machine may lose
  that share of its efficiency on top). A drop past ``throughput_tolerance`` but within that bound is *not
  comparable* (the note says why; not a failure); past it, a regression even on a busy machine. Measured on 2 cores
  (see docs/check.md): with one or two busy loops beside it, clean code's paired efficiency moved -12 % to +17 % (the
  unpaired ratio fell 25-45 %); ONNX Runtime off moved it -77 % to -80 %.

Cells only in the baseline are listed as missing (not a failure). Bad input (unreadable files, unknown
schema, no overlapping cells) raises :class:`UserError`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hica_bench.errors import UserError
from hica_bench.files import short
from hica_bench.extraction.encode import REFERENCE_PASSES
from hica_bench.metrics import HEADLINE, aggregate
from hica_bench.results import LEGACY, Origin, ResultsStore, Status, origin_differences

#: a cell: a corrupted test split (robustness track) is a cell of its own
CELL = ["dataset", "size", "encoder", "method", "k", "max_test", "corruption", "severity", "protocol"]
#: environment facts whose difference makes raw speeds (device, cpu, threads) or scores (packages) incomparable
SPEED_FACTS = ("device", "device_name", "cpu_model", "cpu_count", "torch_threads")
DEFAULT_TOLERANCE = 1.0  #: percentage points
DEFAULT_THROUGHPUT_TOLERANCE = 0.4  #: relative drop of harness efficiency (its run-to-run spread on a shared 2-core VM: ±18 %)
BUSY = 0.1  #: share of the machine's CPU time used by other processes from which a throughput counts as measured under load


Key = tuple  #: (dataset, size, encoder, method, k, max_test, corruption, severity, protocol)


@dataclass
class Side:
    """One input file. ``cells`` maps a cell key to its summary: status, reason, seeds (that ran), n (seeds ok),
    ``{metric}_mean`` and ``{metric}_std``; ``per_seed`` (results files only) maps a cell key to one record per seed."""

    path: Path
    cells: dict[Key, dict[str, Any]]
    per_seed: dict[Key, list[dict[str, Any]]] | None
    efficiency: dict[tuple, float]  #: (dataset, size, encoder) -> median encoder images/s ÷ reference images/s
    environment: dict[str, Any] = field(default_factory=dict)
    origins: dict[Key, str] = field(default_factory=dict)  #: the origin compared per cell (results files: origin_id)
    origin_of: dict[str, Origin] = field(default_factory=dict)  #: origin_id -> Origin (results files)
    notes: list[str] = field(default_factory=list)  #: what reading this side found worth saying
    paired: dict[tuple, float] = field(default_factory=dict)  #: (dataset, size, encoder) -> median paired efficiency
    spread: dict[tuple, float] = field(default_factory=dict)  #: -> the largest relative IQR of its pairs
    contention: dict[tuple, float] = field(default_factory=dict)  #: -> the largest CPU share other processes used


@dataclass
class Report:
    rows: pd.DataFrame  #: verdict, dataset, size, encoder, method, k, max_test, what, baseline, run, change, allowed, note
    compared: int
    notes: list[str]

    def count(self, verdict: str) -> int:
        return int((self.rows["verdict"] == verdict).sum())

    @property
    def regressed(self) -> bool:
        return self.count("regressed") > 0


def _resolve(path: Path, role: str) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in ("results.jsonl", "leaderboard.csv"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"{role} folder {str(path)!r} holds neither results.jsonl nor leaderboard.csv")
    if not path.is_file():
        raise UserError(f"{role} file {str(path)!r} does not exist")
    return path


def load(path: Path, role: str = "results") -> Side:
    """Read a results.jsonl or leaderboard.csv (or a folder with one) into a :class:`Side`."""
    path = _resolve(path, role)
    if path.suffix == ".jsonl":
        return _load_results(path, role)
    if path.suffix == ".csv":
        return _load_leaderboard(path, role)
    raise UserError(f"{role} {str(path)!r}: expected a results .jsonl or a leaderboard .csv")


def _load_results(path: Path, role: str) -> Side:
    results = list(ResultsStore(path).load().values())
    if not results:
        raise UserError(f"{role} {str(path)!r} holds no results")
    newest_origin: dict[Key, tuple[int, str]] = {}  # cell -> (place in the file, origin_id) of its newest result
    all_origins: dict[Key, set[str]] = {}
    for position, r in enumerate(results):  # in file order: a later record is newer (also within one second)
        key = tuple(getattr(r.key, c) for c in CELL)
        all_origins.setdefault(key, set()).add(r.origin_id)
        newest_origin[key] = (position, r.origin_id)
    per_seed: dict[Key, list[dict[str, Any]]] = {}
    efficiencies: dict[tuple, list[float]] = {}
    paired: dict[tuple, list[float]] = {}
    spread: dict[tuple, float] = {}
    contention: dict[tuple, float] = {}
    for r in results:
        key = tuple(getattr(r.key, c) for c in CELL)
        if r.origin_id != newest_origin[key][1]:
            continue  # an older origin of this cell: never mixed with the newest
        record = {"seed": r.key.seed, "status": r.status.value, "reason": r.reason,
                  **{m: float(getattr(r.metrics, m)) if r.metrics else math.nan for m in HEADLINE}}
        per_seed.setdefault(key, []).append(record)
        if r.timings.efficiency:
            efficiencies.setdefault(key[:3], []).append(r.timings.efficiency)
        if r.timings.paired_efficiency:
            paired.setdefault(key[:3], []).append(r.timings.paired_efficiency)
        for found, value in ((spread, r.timings.efficiency_spread), (contention, r.timings.cpu_contention)):
            if value is not None:
                found[key[:3]] = max(found.get(key[:3], 0.0), value)
    cells = {key: _summarise(records) for key, records in per_seed.items()}
    shared = sorted(key for key, found in all_origins.items() if len(found) > 1)
    notes = [f"{role} holds results of several origins for {len(shared)} cells (e.g. {_name(shared[0])}); the newest "
             "origin of each is compared"] if shared else []
    newest = max(results, key=lambda r: r.finished_at)
    return Side(path, cells, per_seed, {k: float(np.median(v)) for k, v in efficiencies.items()},
                asdict(newest.environment), {key: origin for key, (_, origin) in newest_origin.items()},
                {r.origin_id: r.identity.origin for r in results if r.identity is not None}, notes,
                {k: float(np.median(v)) for k, v in paired.items()}, spread, contention)


def _name(key: Key) -> str:
    return f"{key[0]} {key[3]} k={key[4]}"


def _load_leaderboard(path: Path, role: str) -> Side:
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{role} {str(path)!r} is not a readable CSV ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    stats = [f"{m}_{s}" for m in HEADLINE for s in ("mean", "std")]
    for optional in ("corruption", "severity"):  # leaderboards before the robustness track: clean cells only
        if optional not in frame.columns:
            frame[optional] = None
    if "protocol" not in frame.columns:  # leaderboards before protocols: every cell was a few-shot one
        frame["protocol"] = "few-shot"
    missing = [c for c in CELL + ["n"] + stats if c not in frame.columns]
    if missing:
        raise UserError(f"{role} {str(path)!r} is not a hica-bench leaderboard.csv (lacks columns {', '.join(missing)})")
    if frame.empty:
        raise UserError(f"{role} {str(path)!r} holds no results")
    if "origin" in frame.columns:  # several origins of a cell: keep the newest
        newest = "last" if "last" in frame.columns else "finished" if "finished" in frame.columns else None
        if newest:
            frame = frame.sort_values(newest, kind="stable").drop_duplicates(CELL, keep="last")
    cells: dict[Key, dict[str, Any]] = {}
    efficiencies: dict[tuple, list[float]] = {}
    origins: dict[Key, str] = {}
    for row in frame.to_dict("records"):
        try:
            key = (str(row["dataset"]), int(row["size"]), str(row["encoder"]), str(row["method"]), int(row["k"]),
                   None if pd.isna(row["max_test"]) else int(row["max_test"]),
                   None if pd.isna(row["corruption"]) else str(row["corruption"]),
                   None if pd.isna(row["severity"]) else int(row["severity"]), str(row["protocol"]))
            seeds = frozenset(int(s) for s in str(row["seeds"]).split(",")) if "seeds" in row else None
            values = {s: float(row[s]) for s in stats}
            bad = [s for s, v in values.items() if not (math.isnan(v) or (0 <= v <= 1 if s.endswith("_mean") else v >= 0))
                   or math.isinf(v)]
            if bad or int(row["n"]) < 1 or key[4] < 1:
                raise ValueError(f"{bad[0]} = {values[bad[0]]}, outside [0, 1]" if bad else "n and k must be >= 1")
            cells[key] = {"status": "ok", "reason": None, "seeds": seeds, "n": int(row["n"]), **values}
            if "origin" in row:
                origins[key] = str(row["origin"])
            ips, ref = row.get("encoder_images_per_s_mean"), row.get("reference_images_per_s_mean")
            if ips and ref and not (pd.isna(ips) or pd.isna(ref)):
                ratio = float(ips) / float(ref)
                if not math.isfinite(ratio) or ratio <= 0:
                    raise ValueError("the throughput columns must be positive numbers")
                efficiencies.setdefault(key[:3], []).append(ratio)
        except (TypeError, ValueError, OverflowError, ZeroDivisionError) as exc:
            raise UserError(f"{role} {str(path)!r}: malformed row {short(row.get('dataset'), 40)} "
                            f"{short(row.get('method'), 40)} ({short(str(exc), 120)[1:-1]})") from None
    return Side(path, cells, None, {k: float(np.median(v)) for k, v in efficiencies.items()}, origins=origins)


def _summarise(records: list[dict[str, Any]], seeds: frozenset | None = None) -> dict[str, Any]:
    """A cell's summary over its seed records (only ``seeds`` when given): status ``failed`` if any seed failed,
    else ``not_applicable`` if any was, else ``ok``; mean and sample std of each metric over the ok seeds."""
    records = [r for r in records if seeds is None or r["seed"] in seeds]
    statuses = {r["status"] for r in records}
    status = next(s.value for s in (Status.FAILED, Status.NOT_APPLICABLE, Status.OK) if s.value in statuses)
    reason = next((r["reason"] for r in records if r["status"] == status and r["reason"]), None)
    ok = [r for r in records if r["status"] == Status.OK.value]
    summary = {"status": status, "reason": reason, "seeds": frozenset(r["seed"] for r in records), "n": len(ok)}
    for m in HEADLINE:
        stats = aggregate(r[m] for r in ok)
        summary[f"{m}_mean"], summary[f"{m}_std"] = stats["mean"], stats["std"]
    return summary


def compare(baseline: Side, run: Side, tolerance: float = DEFAULT_TOLERANCE, noise_z: float = 0.0,
            throughput_tolerance: float = DEFAULT_THROUGHPUT_TOLERANCE) -> Report:
    """Compare ``run`` with ``baseline`` (see the module docstring); raises :class:`UserError` when no cell overlaps."""
    if not (0 <= tolerance < math.inf and 0 <= noise_z < math.inf and 0 <= throughput_tolerance < 1):  # NaN fails too
        raise UserError("--tolerance and --noise-z must be finite numbers >= 0 and --throughput-tolerance in [0, 1)")
    common = sorted((key for key in baseline.cells if key in run.cells), key=_sortable)
    if not common:
        raise UserError(f"no cell of {run.path} is in the baseline {baseline.path} "
                        f"(baseline: {_describe(baseline.cells)}; run: {_describe(run.cells)})")
    rows: list[dict[str, Any]] = []
    for key in common:
        rows += _compare_cell(key, baseline, run, tolerance, noise_z)
    for key in sorted(set(baseline.cells) - set(run.cells), key=_sortable):
        rows.append(_row("missing", key, "cell", note="in the baseline, not in the run"))
    notes = []
    for pass_key in sorted({key[:3] for key in common}, key=_sortable):
        base_eff, run_eff = baseline.efficiency.get(pass_key), run.efficiency.get(pass_key)
        if base_eff is None or run_eff is None:
            side = "baseline" if base_eff is None else "run"
            notes.append(f"throughput of {pass_key[0]} not compared: the {side} has no encoder images/s with a reference "
                         "(its features came from the cache, its splits were too small for the yardstick, or it predates reference "
                         "timing)")
            continue
        rows.append(_throughput_row(pass_key, baseline, run, throughput_tolerance))
    notes += baseline.notes + run.notes + _origin_differences(baseline, run, common)
    notes += environment_differences(baseline.environment, run.environment)
    frame = pd.DataFrame(rows, columns=["verdict", *CELL, "what", "baseline", "run", "change", "allowed", "note"])
    return Report(frame, len(common), notes)


def paired_noise(spread_baseline: float, spread_run: float, pairs: int = REFERENCE_PASSES) -> float:
    """Two standard errors of (run − baseline) of paired efficiency, relative: each side's median of ``pairs`` ratios
    has a standard error of about 1.2533 σ / √pairs, with σ ≈ its interquartile range / 1.349 (normal ratios)."""
    se = 1.2533 / 1.349 / math.sqrt(pairs)
    return 2 * se * math.hypot(spread_baseline, spread_run)


def _throughput_row(pass_key: tuple, baseline: Side, run: Side, tolerance: float) -> dict[str, Any]:
    """The harness-efficiency row of one encoder pass (see the module docstring for the bound)."""
    both_paired = pass_key in baseline.paired and pass_key in run.paired
    source = (lambda side: side.paired) if both_paired else (lambda side: side.efficiency)
    base_eff, run_eff = source(baseline)[pass_key], source(run)[pass_key]
    change = run_eff / base_eff - 1
    spread = paired_noise(baseline.spread.get(pass_key, 0.0), run.spread.get(pass_key, 0.0)) if both_paired else 0.0
    base_load, run_load = baseline.contention.get(pass_key, 0.0), run.contention.get(pass_key, 0.0)
    load = max(base_load, run_load) if max(base_load, run_load) >= BUSY else 0.0
    bound = max(tolerance, spread)
    bound = 1 - (1 - bound) * (1 - load)
    reasons = []
    if spread > tolerance:
        reasons.append(f"the runs' own noise is ±{100 * spread:.0f} %")
    if load:
        busy = "run" if run_load >= base_load else "baseline"
        reasons.append(f"other processes used {100 * load:.0f} % of the CPUs during the {busy}'s encoder pass")
    what = "harness / plain eager images/s" + (" (paired)" if both_paired else "")
    allowed = f"-{100 * bound:.0f}%"
    if change < -bound:
        verdict, note = "regressed", "; ".join(reasons)
    elif change < -tolerance:
        verdict, note = "not comparable", f"a drop within what the measurement's noise allows ({'; '.join(reasons)}): " \
                                          "rerun on an idle machine to judge it"
    else:
        verdict, note = ("improved" if change > tolerance else "ok"), ""
    return _row(verdict, pass_key + ("(encoder pass)", None, None), what, f"{base_eff:.3f}", f"{run_eff:.3f}",
                f"{100 * change:+.1f}%", allowed, note)


def _compare_cell(key: Key, baseline: Side, run: Side, tolerance: float, noise_z: float) -> list[dict[str, Any]]:
    base, new = baseline.cells[key], run.cells[key]
    note = ""
    if baseline.per_seed is not None and run.per_seed is not None and base["seeds"] != new["seeds"]:
        seeds = base["seeds"] & new["seeds"]
        if seeds:  # compare like with like: the seeds both sides ran
            base, new = _summarise(baseline.per_seed[key], seeds), _summarise(run.per_seed[key], seeds)
            note = f"common seeds {','.join(map(str, sorted(seeds)))}"
    elif base["seeds"] is not None and new["seeds"] is not None and base["seeds"] != new["seeds"]:
        note = "seeds differ"
    if base["status"] != "ok" or new["status"] != "ok":
        if base["status"] == new["status"]:
            return []
        verdict = ("regressed" if base["status"] == "ok" or new["status"] == "failed"
                   else "improved" if new["status"] == "ok" else "changed")
        return [_row(verdict, key, "status", base["status"], new["status"], note=new["reason"] or base["reason"] or "")]
    rows = []
    for m in HEADLINE:
        b, r = base[f"{m}_mean"], new[f"{m}_mean"]
        if math.isnan(b):
            continue
        bound = tolerance
        if noise_z and base["n"] > 1 and new["n"] > 0:
            bound = max(tolerance, 100 * noise_z * base[f"{m}_std"] * math.sqrt(1 / base["n"] + 1 / new["n"]))
        change = 100 * (r - b)
        verdict = "regressed" if math.isnan(r) or change < -bound else "improved" if change > bound else "ok"
        rows.append(_row(verdict, key, m.upper(), f"{100 * b:.1f}", f"{100 * r:.1f}", f"{change:+.1f}", f"-{bound:.1f}", note))
    return rows


def _origin_differences(baseline: Side, run: Side, common: list[Key]) -> list[str]:
    """One note per distinct way the compared cells' origins differ between the two sides."""
    differing: dict[str, list[Key]] = {}
    for key in common:
        base, new = baseline.origins.get(key), run.origins.get(key)
        if base is None or new is None or base == new:
            continue
        if LEGACY in (base, new) or base not in baseline.origin_of or new not in run.origin_of:
            what = ("one side has legacy results (schema 1, origin not recorded)" if LEGACY in (base, new)
                    else f"origin ⟨{base}⟩ vs ⟨{new}⟩")
        else:
            what = "; ".join(origin_differences(baseline.origin_of[base], run.origin_of[new])) or "origin ids differ"
        differing.setdefault(what, []).append(key)
    return [f"{len(keys)} compared cells differ in origin from the baseline (e.g. {_name(keys[0])}): {what}"
            for what, keys in differing.items()]


def _row(verdict: str, key: tuple, what: str, baseline="", run="", change="", allowed="", note="") -> dict[str, Any]:
    return {"verdict": verdict, **dict(zip(CELL, key)), "what": what, "baseline": baseline, "run": run,
            "change": change, "allowed": allowed, "note": note}


def _sortable(key: tuple) -> tuple:
    return tuple((v is None, v if v is not None else 0) for v in key)


def _describe(cells: dict) -> str:
    def values(i: int) -> str:
        found = sorted({"full" if key[i] is None else str(key[i]) for key in cells})
        return ",".join(found[:4]) + (",…" if len(found) > 4 else "")

    return "; ".join(f"{name} {values(i)}" for i, name in enumerate(CELL) if name != "k")


def environment_differences(baseline: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """Lines saying why two runs' raw speeds or scores may not be comparable (empty when they are, or unknown)."""
    if not baseline or not run:
        return []
    notes = []
    speed = [f"{fact} {baseline.get(fact)!r} vs {run.get(fact)!r}" for fact in SPEED_FACTS  # None: not known to that run
             if None not in (baseline.get(fact), run.get(fact)) and baseline.get(fact) != run.get(fact)]
    if speed:
        notes.append("different machines (raw images/s not comparable; harness / plain eager is): " + "; ".join(speed))
    base_packages, run_packages = baseline.get("packages", {}), run.get("packages", {})
    changed = [f"{name} {base_packages.get(name, '-')} → {run_packages.get(name, '-')}"
               for name in sorted(set(base_packages) | set(run_packages)) if base_packages.get(name) != run_packages.get(name)]
    if changed:
        notes.append("package versions differ (scores may differ numerically): " + "; ".join(changed))
    base_backend, run_backend = (side.get("extraction", {}).get("backend") for side in (baseline, run))
    if base_backend and run_backend and base_backend != run_backend:
        notes.append(f"encoder backend differs ({base_backend} vs {run_backend}): features agree only within the backends' "
                     "tolerance, and methods that cluster or train on features (e.g. HiCA's stage 1) can move by "
                     "points on that; pass the baseline's --backend to compare like with like")
    if baseline.get("git") != run.get("git"):
        notes.append(f"code differs: baseline git {str(baseline.get('git'))[:12]}, run git {str(run.get('git'))[:12]}")
    return notes
