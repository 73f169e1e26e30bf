"""Results -> pandas -> leaderboard tables (Markdown for people, CSV for tools).

Per dataset and encoder: one row per method *and origin*, one column per shot count, cells ``mean ± h (n)`` over
seeds, in percent, for ACC and AUC, where ``h`` is the half-width of the 95 % t-interval of the mean (the CSV also
has the sample std, the standard error and the interval's ends). Results of different origins (:class:`hica_bench.results.Origin`: another
checkpoint, backend, plugin version, option default, dataset file...) are never averaged together: when two
origins share a method label, each gets its own row, marked with its ``origin_id``, and a note says what differs.
Methods that do not apply are listed with their reason.

Cells whose test split was corrupted (the robustness track, :mod:`hica_bench.corruptions`) are not in those tables:
:func:`robustness_table` summarises them against the clean cells of the same seeds (``robustness.csv`` and a section
of ``leaderboard.md``).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pandas as pd

from hica_bench.files import atomic_write
from hica_bench.metrics import HEADLINE, METRICS, aggregate
from hica_bench.results import LEGACY, CellResult, Origin, Status, Timings, origin_differences

#: per-cell timings of the encoder pass: the harness's images/s and the plain eager forward's, measured in the same
#: run (``hica-bench check`` compares their ratio)
THROUGHPUT = tuple(f.name for f in fields(Timings) if f.name.endswith("_images_per_s"))
BLOCK = ["dataset", "size", "encoder", "max_test", "protocol"]  #: one section of the leaderboard
#: what a leaderboard row is: a label, and the origin of its results (a corrupted test split and another protocol are
#: rows of their own; those columns come last, so the columns before them keep the places they had)
ROW = ["dataset", "size", "encoder", "method", "k", "max_test", "origin", "corruption", "severity", "protocol"]


def results_frame(results: list[CellResult]) -> pd.DataFrame:
    """One row per result; ``position`` is its place in the results file (later is newer, also within one second)."""
    rows = []
    for position, r in enumerate(results):
        row = {**r.key.__dict__, "origin": r.origin_id, "status": r.status.value, "reason": r.reason,
               "finished_at": r.finished_at, "position": position, "fit_s": r.timings.fit_s,
               "adapted_encode_s": float("nan") if r.timings.adapted_encode_s is None else r.timings.adapted_encode_s}
        row.update({m: getattr(r.metrics, m) if r.metrics else float("nan") for m in METRICS})
        for timing in THROUGHPUT:
            value = getattr(r.timings, timing)
            row[timing] = float("nan") if value is None else value
        paired = r.timings.paired_efficiency  # images/s over the plain eager forward's, timed in alternation
        row["paired_efficiency"] = float("nan") if paired is None else paired
        if r.novel is not None:  # base-to-novel: the novel classes' scores (``metrics`` are the base classes')
            row["base_to_novel"] = True
            row.update({f"novel_{m}": getattr(r.novel.metrics, m) if r.novel.metrics else float("nan") for m in NOVEL})
        if r.multilabel is not None:  # multi-label: mean AP and each label's AUC (``metrics.auc`` is their mean)
            row["multilabel"] = True
            row["ap"] = r.multilabel.mean_ap
            row.update({f"{LABEL_AUC}{name}": float("nan") if auc is None else auc
                        for name, auc in zip(r.multilabel.labels, r.multilabel.auc)})
        rows.append(row)
    return pd.DataFrame(rows)


NOVEL = ("acc", "balanced_acc", "auc")  #: the novel classes' metrics a leaderboard summarises (base-to-novel)
LABEL_AUC = "auc:"  #: multi-label: the column prefix of each label's AUC (``auc:effusion``)


def harmonic_mean(base: float, novel: float) -> float:
    """CoCoOp's HM of the base and novel accuracies (of their means over seeds); NaN when either is missing."""
    if base != base or novel != novel:
        return float("nan")
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def summary_table(results: list[CellResult]) -> pd.DataFrame:
    """One row per (dataset, size, encoder, method, k, max_test, origin): mean/std/n of every metric over seeds."""
    frame = results_frame([r for r in results if r.status is Status.OK])
    if frame.empty:
        return frame
    rows = []
    for keys, part in frame.groupby(ROW, dropna=False, sort=True):
        row = {name: None if isinstance(value, float) and value != value else value for name, value in zip(ROW, keys)}
        for metric in METRICS:
            stats = aggregate(part[metric])
            for name in ("mean", "std", "n", "se", "ci_low", "ci_high"):
                row[f"{metric}_{name}"] = stats[name]
        row["n"] = len(part)
        row["seeds"] = ",".join(str(s) for s in sorted(part["seed"]))
        row["fit_s_mean"] = pd.to_numeric(part["fit_s"], errors="coerce").mean()
        row["adapted_encode_s_mean"] = pd.to_numeric(part["adapted_encode_s"], errors="coerce").mean()
        for timing in THROUGHPUT:
            row[f"{timing}_mean"] = pd.to_numeric(part[timing], errors="coerce").mean()
        row["paired_efficiency_mean"] = pd.to_numeric(part["paired_efficiency"], errors="coerce").mean()
        row["finished"] = part["finished_at"].max()
        row["last"] = int(part["position"].max())
        if "base_to_novel" in part and part["base_to_novel"].eq(True).any():  # novel means; HM of base and novel means
            for metric in NOVEL:
                stats = aggregate(part[f"novel_{metric}"])
                row[f"novel_{metric}_mean"], row[f"novel_{metric}_n"] = stats["mean"], stats["n"]
                row[f"hm_{metric}"] = harmonic_mean(row[f"{metric}_mean"], stats["mean"])
        if "multilabel" in part and part["multilabel"].eq(True).any():  # mean AP, and each label's mean AUC over seeds
            for column in ["ap", *(c for c in part.columns if c.startswith(LABEL_AUC))]:
                stats = aggregate(part[column])
                for name in ("mean", "n", "ci_low", "ci_high"):
                    row[f"{column}_{name}"] = stats[name]
        rows.append(row)
    return pd.DataFrame(rows)


def _protocol(protocol: str, tuned_on_test: set[str]) -> str:
    """A section heading's protocol: nothing for the plain few-shot protocol; the oracle's label says what it is."""
    if protocol == "few-shot":
        return ""
    if protocol in tuned_on_test:
        return f", protocol `{protocol}` — oracle (test-set tuning): measures inflation, never a result to publish"
    return f", protocol `{protocol}`"


def _base_to_novel(part: pd.DataFrame) -> list[str]:
    """The base, novel and HM accuracies of a base-to-novel section (CoCoOp's columns), percent, means over seeds;
    ``n/a`` where a method cannot name unseen classes (the reason is in each record's ``novel``)."""
    text = part.pivot(index="shown", columns="k", values="acc_mean").astype(object)
    for _, row in part.iterrows():
        novel = row.get("novel_acc_mean", float("nan"))
        shown = "n/a" if novel != novel else f"{100 * novel:.1f}"
        hm = row.get("hm_acc", float("nan"))
        text.loc[row["shown"], row["k"]] = (f"{100 * row['acc_mean']:.1f} / {shown} / "
                                            f"{'n/a' if hm != hm else f'{100 * hm:.1f}'}")
    text = text.fillna("—")
    text.columns = [f"{k}-shot" for k in text.columns]
    text.index.name = "method"
    lines = ["**ACC base / novel / HM** (base: the base classes' test images among the base classes; novel: the novel "
             "classes' among the novel classes, by a method that can name classes it never saw)", "",
             text.reset_index().to_markdown(index=False), ""]
    if part["novel_acc_mean"].isna().any():
        lines += ["n/a: not applicable on novel classes (the method cannot name classes it was not fitted on); its base "
                  "score is reported.", ""]
    return lines


MULTILABEL_NOTE = ("Multi-label (each label scored one-vs-rest on every test image): AUC is the mean of the labels' AUCs "
                   "(ChestMNIST's convention), ACC the mean of their accuracies at the 0.5 threshold, AP the mean "
                   "average precision; the per-label AUCs are at the largest k.")


def _multilabel(part: pd.DataFrame) -> list[str]:
    """A multi-label section's mean-AP table and its per-label AUC table (methods × labels, at the largest k)."""
    text = part.pivot(index="shown", columns="k", values="ap_mean").astype(object)
    for _, row in part.iterrows():
        text.loc[row["shown"], row["k"]] = _cell(row["ap_mean"], row["ap_ci_low"], row["ap_ci_high"], int(row["ap_n"]))
    text = text.fillna("—")
    text.columns = [f"{k}-shot" for k in text.columns]
    text.index.name = "method"
    k = part["k"].max()
    labels = [c[:-len("_mean")] for c in part.columns if c.startswith(LABEL_AUC) and c.endswith("_mean")]
    top = part[part["k"] == k].set_index("shown")
    per_label = pd.DataFrame({c[len(LABEL_AUC):]: [f"{100 * v:.1f}" if v == v else "—" for v in top[f"{c}_mean"]]
                              for c in labels}, index=top.index)
    per_label.index.name = "method"
    return [MULTILABEL_NOTE, "", "**AP**", "", text.reset_index().to_markdown(index=False), "",
            f"**AUC per label ({int(k)}-shot)**", "", per_label.reset_index().to_markdown(index=False), ""]


def _cell(mean: float, low: float | None, high: float | None, n: int) -> str:
    """``mean ± half-width of the 95 % t-interval (n)``, in percent; one seed: ``mean (1)``, no interval."""
    if mean != mean:
        return "n/a"
    if n < 2 or low is None or low != low:
        return f"{100 * mean:.1f} (1)" if n == 1 else f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * (high - low) / 2:.1f} ({n})"


def _cost(part: pd.DataFrame, extraction: str | None) -> str:
    """One line: encoder images/s (with how it ran, and × the plain eager forward) and each method's mean fit seconds."""
    ips, ref = part["encoder_images_per_s_mean"].mean(), part["reference_images_per_s_mean"].mean()
    encoder = "encoder features from the cache (no images/s measured)" if ips != ips else f"encoder {ips:.1f} images/s"
    if ips == ips and extraction:
        encoder += f" ({extraction})"
    paired = part["paired_efficiency_mean"].mean() if "paired_efficiency_mean" in part else float("nan")
    if ips == ips and paired == paired:  # the paired ratio the records hold (timed in alternation with the reference)
        encoder += f", {paired:.2f}× the plain eager forward (paired)"
    elif ips == ips and ref == ref:
        encoder += f", {ips / ref:.2f}× the plain eager forward (unpaired)"
    fits = part.groupby("shown", sort=True)["fit_s_mean"].mean()
    line = f"Cost: {encoder}; fit seconds per cell (mean): " + ", ".join(f"{m} {s:.3g}" for m, s in fits.items())
    adapted = part.groupby("shown", sort=True)["adapted_encode_s_mean"].mean().dropna()
    if len(adapted):  # methods that adapt the encoder: encoding the test images through it (0: from the cache)
        line += "; encoding the test images through the adapted encoder, seconds per cell (mean): " + ", ".join(
            f"{m} {s:.3g}" for m, s in adapted.items())
    return line


def _extraction(settings: dict | None) -> str | None:
    if not settings:
        return None
    from hica_bench.extraction.tuning import ExtractionSettings

    try:
        return ExtractionSettings(**settings).describe()
    except TypeError:  # settings of another version
        return None


def row_label(method: str, origin: str, origins: dict[str, set[str]]) -> str:
    """A row's label: the method, with ``⟨origin⟩`` where the method has results of several origins in the section
    (``origins``: method -> its origins there, whatever their status)."""
    return method if len(origins.get(method, ())) <= 1 else f"{method} ⟨{origin}⟩"


def _shared_labels(part: pd.DataFrame, origins: dict[str, Origin]) -> list[str]:
    """A note per method label that has several origins in this block: what differs from the newest origin."""
    lines = []
    for method, rows in part.groupby("method", sort=True):
        found = rows.groupby("origin")["last"].max().sort_values(ascending=False)  # newest origin first
        if len(found) < 2:
            continue
        newest = found.index[0]
        described = []
        for origin in found.index[1:]:
            if LEGACY in (origin, newest) or origin not in origins or newest not in origins:
                described.append(f"⟨{origin}⟩" + (" (legacy: schema-1 results, origin not recorded)" if origin == LEGACY else ""))
                continue
            changes = origin_differences(origins[origin], origins[newest])
            described.append(f"⟨{origin}⟩ differs in " + "; ".join(changes[:6]) + ("; …" if len(changes) > 6 else ""))
        lines.append(f"- `{method}` has results of {len(found)} origins, never averaged together: ⟨{newest}⟩ is the "
                     "newest; " + "; ".join(described) + ".")
    return lines


def markdown(results: list[CellResult], robustness: pd.DataFrame | None = None) -> str:
    """``leaderboard.md``; ``robustness``: :func:`robustness_table` of ``results`` when the caller has it already."""
    corrupted = [r for r in results if r.key.corruption is not None]
    results = [r for r in results if r.key.corruption is None]
    summary = summary_table(results)
    lines = ["# hica-bench leaderboard", "",
             "Percent, mean ± half-width of its 95 % t-interval over seeds (n seeds; the standard error and the sample "
             "std are in the CSV). AUC follows medmnist's convention. Results of different origins (encoder weights, "
             "backend, plugin versions, options, dataset files) are never averaged together.", ""]
    origins = {r.origin_id: r.identity.origin for r in results if r.identity is not None}
    sections: dict[tuple, dict[str, set[str]]] = {}  # section -> method -> its origins (any status)
    not_applicable: dict[tuple, dict[tuple[str, str], str]] = {}  # section -> (method, origin) -> reason
    tuned_on_test = {r.key.protocol for r in results if _selection(r).get("rule") == "test"}  # the oracle's cells
    for r in results:
        section = (r.key.dataset, r.key.size, r.key.encoder, r.key.max_test, r.key.protocol)
        sections.setdefault(section, {}).setdefault(r.key.method, set()).add(r.origin_id)
        if r.status is Status.NOT_APPLICABLE:
            not_applicable.setdefault(section, {})[(r.key.method, r.origin_id)] = r.reason
    failed = sum(r.status is Status.FAILED for r in results)
    extraction = {(r.key.dataset, r.key.encoder): _extraction(r.environment.extraction)
                  for r in sorted(results, key=lambda r: r.finished_at or "") if r.timings.encoder_images_per_s}
    blocks = summary.groupby(BLOCK, dropna=False, sort=True) if not summary.empty else []
    shown_sections = set()
    for (dataset, size, encoder, max_test, protocol), part in blocks:
        section = (dataset, int(size), encoder, None if pd.isna(max_test) else int(max_test), protocol)
        shown_sections.add(section)
        labels = sections.get(section, {})
        part = part.assign(shown=[row_label(m, o, labels) for m, o in zip(part["method"], part["origin"])])
        test = "full test split" if pd.isna(max_test) else f"first {int(max_test)} test images"
        random = any("random-init" in origins[o].features.get("encoder", "") for o in set(part["origin"]) if o in origins)
        weights = " (random init: not trained weights)" if random else ""
        lines += [f"## {dataset} ({size} px) — encoder `{encoder}`{weights}, {test}{_protocol(protocol, tuned_on_test)}", "",
                  _cost(part, extraction.get((dataset, encoder))), ""]
        for metric in HEADLINE:
            table = part.pivot(index="shown", columns="k", values=f"{metric}_mean")
            text = table.copy().astype(object)
            for _, row in part.iterrows():
                text.loc[row["shown"], row["k"]] = _cell(row[f"{metric}_mean"], row[f"{metric}_ci_low"],
                                                         row[f"{metric}_ci_high"], int(row[f"{metric}_n"]))
            text = text.fillna("—")
            text.columns = [f"{k}-shot" for k in text.columns]
            text.index.name = "method"
            lines += [f"**{metric.upper()}**", "", text.reset_index().to_markdown(index=False), ""]
        if "novel_acc_n" in part and part["novel_acc_n"].notna().any():  # a section of base-to-novel cells
            lines += _base_to_novel(part)
        if "ap_n" in part and part["ap_n"].notna().any():  # a multi-label dataset's section
            lines += _multilabel(part)
        shared = _shared_labels(part, origins)
        if shared:
            lines += [*shared, ""]
        skipped = sorted((row_label(m, o, labels), why) for (m, o), why in not_applicable.get(section, {}).items())
        for method, why in skipped:
            lines.append(f"- `{method}`: not applicable — {why}")
        if skipped:
            lines.append("")
    for section, reasons in sorted(not_applicable.items(), key=lambda item: str(item[0])):
        if section not in shown_sections:  # nothing of this section ran ok: its not-applicable cells still show
            for (method, origin), why in sorted(reasons.items()):
                lines.append(f"- {section[0]} / `{section[2]}` / `{row_label(method, origin, sections[section])}`: "
                             f"not applicable — {why}")
    if corrupted:
        table = robustness if robustness is not None else robustness_table(results + corrupted)
        lines += ["", *robustness_markdown(table)]
    failed += sum(r.status is Status.FAILED for r in corrupted)
    if failed:
        lines += ["", f"{failed} cell(s) failed; see the results file for their errors."]
    return "\n".join(lines).rstrip() + "\n"


#: one robustness row: a section of the leaderboard, a method (with the origin of its clean cells) and k
ROBUST_ROW = ["dataset", "size", "encoder", "max_test", "method", "k"]


def robustness_table(results: list[CellResult]) -> pd.DataFrame:
    """Per (dataset, size, encoder, max_test, method, k): the clean scores and those on the corrupted test splits,
    over the seeds both have (paired). Each corruption × severity is first averaged over those seeds; then:
    ``acc_clean``/``auc_clean``; ``acc_corrupted``/``auc_corrupted``, the mean over corruptions and severities;
    ``acc_drop_rel``, (clean − corrupted) / clean; ``acc_drop_pp`` with its 95 % t-interval over seeds (each seed's
    clean ACC minus its mean corrupted ACC), so a drop within noise shows as an interval reaching 0; MedMNIST-C's
    ``be`` and ``rbe`` (balanced error normalised by AlexNet's, see :mod:`hica_bench.corruptions`; empty where it
    published no AlexNet errors for the dataset); ``variants`` (corruption × severity pairs) and ``seeds``.
    Clean and corrupted cells are paired only when their origins agree in everything but the corruption.

    Those rows have no ``corruption`` (:func:`aggregate_rows`). After each come one row per corruption (over its
    severities: its drop with the interval, and its own BE and rBE terms, rBE empty where it is left out) and one row
    per (corruption, severity) with its paired drop and 95 % t-interval over the same seeds (:func:`variant_rows`): a
    corruption that *raises* accuracy shows as a negative drop."""
    import numpy as np

    from hica_bench import corruptions, stats

    ok = [r for r in results if r.status is Status.OK and r.metrics is not None and r.identity is not None]
    clean: dict[tuple, dict[int, CellResult]] = {}
    damaged: dict[tuple, dict[tuple[str, int], dict[int, CellResult]]] = {}
    for r in sorted(ok, key=lambda r: r.finished_at or ""):  # the newest record of a cell wins
        key = (r.key.dataset, r.key.size, r.key.encoder, r.key.max_test, r.key.method, r.key.k,
               corruptions.clean_origin_id(r.identity.origin))
        if r.key.corruption is None:
            clean.setdefault(key, {})[r.key.seed] = r
        else:
            damaged.setdefault(key, {}).setdefault((r.key.corruption, r.key.severity), {})[r.key.seed] = r
    rows = []
    for key, by_variant in sorted(damaged.items(), key=lambda item: str(item[0])):
        if key not in clean:
            continue
        seeds = set(clean[key])
        for per_seed in by_variant.values():
            seeds &= set(per_seed)
        if not seeds:
            continue
        seeds = sorted(seeds)
        dataset_name = next(iter(next(iter(by_variant.values())).values())).identity.origin.dataset.name
        clean_acc = np.array([clean[key][s].metrics.acc for s in seeds])
        clean_err = float(np.mean([1 - clean[key][s].metrics.balanced_acc for s in seeds]))
        acc = {v: np.array([c[s].metrics.acc for s in seeds]) for v, c in by_variant.items()}
        auc = {v: float(np.nanmean([c[s].metrics.auc for s in seeds])) for v, c in by_variant.items()}
        err = {v: float(np.mean([1 - c[s].metrics.balanced_acc for s in seeds])) for v, c in by_variant.items()}
        corrupted_per_seed = np.mean(np.stack(list(acc.values())), axis=0)
        drop = stats.t_interval(100 * (clean_acc - corrupted_per_seed))
        row = dict(zip(ROBUST_ROW, key[:6]))
        row.update(acc_clean=float(clean_acc.mean()),
                   auc_clean=float(np.nanmean([clean[key][s].metrics.auc for s in seeds])),
                   acc_corrupted=float(corrupted_per_seed.mean()), auc_corrupted=float(np.mean(list(auc.values()))))
        row["acc_drop_rel"] = (row["acc_clean"] - row["acc_corrupted"]) / row["acc_clean"] if row["acc_clean"] else None
        row["acc_drop_pp"] = float(np.mean(100 * (clean_acc - corrupted_per_seed)))
        row["acc_drop_pp_ci_low"], row["acc_drop_pp_ci_high"] = (drop.low, drop.high) if drop else (None, None)
        row["be"], row["rbe"], left_out = corruptions.balanced_error_scores(dataset_name, clean_err, err)
        row["rbe_left_out"] = ";".join(left_out)
        row["variants"] = len(by_variant)
        row["corruptions"] = len({name for name, _ in by_variant})
        row["seeds"] = ",".join(map(str, seeds))
        rows.append(row)
        # each corruption (over its severities: its BE and rBE terms) and each (corruption, severity): paired drops
        terms = corruptions.balanced_error_terms(dataset_name, clean_err, err) or {}
        names = sorted({name for name, _ in by_variant})
        parts = [((name, None), [v for v in by_variant if v[0] == name]) for name in names]
        parts += [(variant, [variant]) for variant in sorted(by_variant)]
        for (name, level), variants in parts:
            per_seed = np.mean(np.stack([acc[v] for v in variants]), axis=0)
            drop = stats.t_interval(100 * (clean_acc - per_seed))
            be, rbe = terms.get(name, (None, None)) if level is None else (None, None)
            rows.append({**dict(zip(ROBUST_ROW, key[:6])), "corruption": name, "severity": level,
                         "acc_clean": float(clean_acc.mean()), "acc_corrupted": float(per_seed.mean()),
                         "auc_corrupted": float(np.mean([auc[v] for v in variants])),
                         "acc_drop_pp": float(np.mean(100 * (clean_acc - per_seed))),
                         "acc_drop_pp_ci_low": drop.low if drop else None,
                         "acc_drop_pp_ci_high": drop.high if drop else None, "be": be, "rbe": rbe,
                         "variants": len(variants), "seeds": ",".join(map(str, seeds))})
    return pd.DataFrame(rows)


#: what the robustness section says above its tables (leaderboard.md and the report)
ROBUSTNESS_NOTE = (
    "Supports stay clean; each test split is corrupted with MedMNIST-C's corruptions for the dataset at the severities "
    "run (`hica_bench/corruptions.py` says how each is reproduced). Percent; *corrupted* is the mean over corruptions "
    "and severities, each first averaged over the seeds the clean cells share; the drop in points has its 95 % "
    "t-interval over those seeds (an interval that reaches 0 is within noise). BE / rBE: MedMNIST-C's balanced error "
    "over AlexNet's, absolute and relative to the clean error (lower is more robust; 1 = as AlexNet). AlexNet is "
    "MedMNIST-C's reference, trained on the full training split at 224 px: the ratios compare with it, they do not "
    "rank a few-shot method against it. rBE leaves out each corruption whose AlexNet excess error is at most 0.02 "
    "(its ratio would flip sign or explode); robustness.csv names them (rbe_left_out).")


def aggregate_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of :func:`robustness_table` over every corruption and severity (not one corruption's, not one
    variant's)."""
    return table[table["corruption"].isna()] if "corruption" in table else table


def variant_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of :func:`robustness_table` of one (corruption, severity) each."""
    return table[table["corruption"].notna() & table["severity"].notna()] if "corruption" in table else table.iloc[:0]


def robustness_blocks(table: pd.DataFrame) -> list[tuple[str, list[dict[str, str]]]]:
    """The robustness table as shown: (title, rows of formatted cells) per (dataset, size, encoder, max_test)."""
    def pct(value) -> str:
        return "—" if value is None or value != value else f"{100 * value:.1f}"

    def ratio(value) -> str:
        return "—" if value is None or value != value else f"{value:.2f}"

    blocks = []
    if table.empty:
        return blocks
    table = aggregate_rows(table)
    for (dataset, size, encoder, max_test), part in table.groupby(["dataset", "size", "encoder", "max_test"],
                                                                  dropna=False, sort=True):
        test = "full test split" if max_test is None or max_test != max_test else f"first {int(max_test)} test images"
        body = []
        for _, row in part.sort_values(["k", "method"]).iterrows():
            low, high = row["acc_drop_pp_ci_low"], row["acc_drop_pp_ci_high"]
            interval = "" if low is None or low != low else f" [{low:.1f}, {high:.1f}]"
            body.append({"method": row["method"], "k": str(int(row["k"])), "ACC clean": pct(row["acc_clean"]),
                         "ACC corrupted": pct(row["acc_corrupted"]),
                         "ACC drop (points)": f"{row['acc_drop_pp']:.1f}{interval}",
                         "relative drop": pct(row["acc_drop_rel"]), "AUC clean": pct(row["auc_clean"]),
                         "AUC corrupted": pct(row["auc_corrupted"]), "BE": ratio(row["be"]), "rBE": ratio(row["rbe"]),
                         "corruptions × severities": str(int(row["variants"])),
                         "seeds": str(len(str(row["seeds"]).split(",")))})
        blocks.append((f"{dataset} ({int(size)} px) — encoder `{encoder}`, {test}", body))
    return blocks


def robustness_markdown(table: pd.DataFrame) -> list[str]:
    """The robustness section of ``leaderboard.md`` (lines)."""
    blocks = robustness_blocks(table)
    if not blocks:
        return []
    lines = ["# Robustness: corrupted test splits (MedMNIST-C)", "", ROBUSTNESS_NOTE, ""]
    for title, body in blocks:
        lines += [f"## {title}", "", pd.DataFrame(body).to_markdown(index=False), ""]
    return lines


def _selection(result: CellResult) -> dict:
    """What a finished cell's protocol selected it by (its ``fit_info["selection"]``: ``rule``, ``metric``, ...); {}."""
    selection = (result.fit_info or {}).get("selection")
    return selection if isinstance(selection, dict) else {}


INFLATION_NOTE = ("Inflation = the oracle's score (options chosen on the test split) minus the score of the same method "
                  "tuned by a rule a few-shot user can apply (validation images, or cross-validation on the support), "
                  "per seed on the same support sets: mean in points ± half-width of its 95 % t-interval over seeds "
                  "(n). An interval that contains 0 is within noise.")


def inflation_table(results: list[CellResult], metric: str = "balanced_acc") -> pd.DataFrame:
    """Test-set tuning inflation: for each (dataset, size, encoder, max_test, method, k) and each protocol whose cells
    were tuned by validation or support-set CV for ``metric``, the oracle's ``metric`` minus that protocol's, paired by
    seed (the oracle: cells tuned on the test split for the same metric). Empty without an oracle."""
    import numpy as np

    from hica_bench.stats import t_interval

    finished = [r for r in results if r.status is Status.OK and r.metrics is not None and r.key.corruption is None]
    cell = lambda r: (r.key.dataset, r.key.size, r.key.encoder, r.key.max_test, r.key.method, r.key.k)  # noqa: E731
    oracle: dict[tuple, dict[int, float]] = {}
    tuned: dict[tuple, dict[int, float]] = {}
    for r in finished:  # the newest record of a cell counts (later in the file)
        rule, tuned_for = _selection(r).get("rule"), _selection(r).get("metric")
        if rule == "test" and tuned_for == metric:  # an oracle that tuned for this metric
            oracle.setdefault(cell(r), {})[r.key.seed] = getattr(r.metrics, metric)
        elif rule in ("validation", "support-cv") and tuned_for == metric:
            tuned.setdefault((*cell(r), r.key.protocol), {})[r.key.seed] = getattr(r.metrics, metric)
    rows = []
    for key, scores in sorted(tuned.items(), key=lambda item: str(item[0])):
        top = oracle.get(key[:-1])
        seeds = sorted(set(scores) & set(top or {}))
        if not seeds:
            continue
        differences = [top[s] - scores[s] for s in seeds]
        interval = t_interval(differences)  # None for one seed: the mean alone
        rows.append({"dataset": key[0], "size": key[1], "encoder": key[2], "max_test": key[3], "method": key[4],
                     "k": key[5], "protocol": key[6], "metric": metric, "n": len(seeds),
                     "oracle_mean": float(np.mean([top[s] for s in seeds])),
                     "protocol_mean": float(np.mean([scores[s] for s in seeds])),
                     "inflation_mean": float(np.mean(differences)),
                     "inflation_ci_low": None if interval is None else interval.low,
                     "inflation_ci_high": None if interval is None else interval.high,
                     "seeds": ",".join(map(str, seeds))})
    return pd.DataFrame(rows)


def inflation_markdown(table: pd.DataFrame) -> list[str]:
    """The inflation section of ``leaderboard.md`` (lines): per dataset and encoder, methods × k."""
    if table.empty:
        return []
    lines = ["# Test-set tuning inflation (oracle − a few-shot selection rule)", "", INFLATION_NOTE, ""]
    for (dataset, size, encoder, protocol), part in table.groupby(["dataset", "size", "encoder", "protocol"], sort=True):
        text = part.pivot(index="method", columns="k", values="inflation_mean").astype(object)
        for _, row in part.iterrows():
            low, high = row["inflation_ci_low"], row["inflation_ci_high"]
            half = "" if low is None or pd.isna(low) else f" ± {100 * (high - low) / 2:.1f}"
            text.loc[row["method"], row["k"]] = f"{100 * row['inflation_mean']:+.1f}{half} ({int(row['n'])})"
        text = text.fillna("—")
        text.columns = [f"{k}-shot" for k in text.columns]
        text.index.name = "method"
        metric = part["metric"].iloc[0].replace("_", " ")
        lines += [f"## {dataset} ({int(size)} px) — encoder `{encoder}`: oracle − `{protocol}`, {metric} (points)", "",
                  text.reset_index().to_markdown(index=False), ""]
    return lines


TRANSFER_NOTE = ("Cross-dataset transfer: each method fitted on k-shot supports of the source dataset (rows) and scored on "
                 "the target dataset's test split (columns), classes matched by name or by the protocol's mapping file; "
                 "the diagonal (source = target) is the in-domain score on the same supports. Percent, mean ± "
                 "half-width of its 95 % t-interval over seeds (n).")


def _transfer_source(result: CellResult) -> str | None:
    """The source dataset of a cross-dataset cell (its label in the grid that ran it), else None."""
    support_from = result.identity.origin.support_from
    return str(support_from.get("dataset")) if isinstance(support_from, dict) else None


def transfer_table(results: list[CellResult], metric: str = "acc") -> pd.DataFrame:
    """Cross-dataset transfer: per (size, encoder, max_test, protocol label but its source, method, k, source, target)
    the mean of ``metric`` over seeds with its 95 % t-interval; empty without cross-dataset cells."""
    import numpy as np

    from hica_bench.stats import t_interval

    scores: dict[tuple, dict[int, float]] = {}
    for r in results:  # the newest record of a cell counts (later in the file)
        source = _transfer_source(r)
        if source is None or r.status is not Status.OK or r.metrics is None or r.key.corruption is not None:
            continue
        variant = ":".join(part for part in r.key.protocol.split(":") if not part.startswith("source="))
        key = (r.key.size, r.key.encoder, r.key.max_test, variant, r.key.method, r.key.k, source, r.key.dataset)
        scores.setdefault(key, {})[r.key.seed] = getattr(r.metrics, metric)
    rows = []
    for key, by_seed in sorted(scores.items(), key=lambda item: str(item[0])):
        values = [by_seed[s] for s in sorted(by_seed)]
        interval = t_interval(values)
        rows.append(dict(zip(("size", "encoder", "max_test", "protocol", "method", "k", "source", "target"), key),
                         metric=metric, n=len(values), mean=float(np.mean(values)),
                         ci_low=None if interval is None else interval.low,
                         ci_high=None if interval is None else interval.high))
    return pd.DataFrame(rows)


def transfer_blocks(table: pd.DataFrame) -> list[tuple[str, list[str], list[list[str]]]]:
    """The transfer table as (title, header, rows) per (size, encoder, protocol, k): rows (method, source), columns
    the targets; the leaderboard and the report show the same blocks."""
    blocks = []
    if table.empty:
        return blocks
    for (size, encoder, protocol, k), part in table.groupby(["size", "encoder", "protocol", "k"], sort=True):
        targets = sorted(set(part["target"]))
        cells = {(row["method"], row["source"], row["target"]): row for _, row in part.iterrows()}
        body = []
        for method, source in sorted({(m, s) for m, s, _ in cells}):
            shown = []
            for target in targets:
                row = cells.get((method, source, target))
                if row is None:
                    shown.append("—")
                    continue
                low, high = row["ci_low"], row["ci_high"]
                half = "" if low is None or pd.isna(low) else f" ± {100 * (high - low) / 2:.1f}"
                shown.append(f"{100 * row['mean']:.1f}{half} ({int(row['n'])})")
            body.append([method, source] + shown)
        metric = part["metric"].iloc[0].replace("_", " ").upper()
        blocks.append((f"{int(size)} px — encoder {encoder}, {protocol}, {int(k)}-shot: {metric}, source (rows) → "
                       "target (columns)", ["method", "source"] + [f"→ {t}" for t in targets], body))
    return blocks


def transfer_markdown(table: pd.DataFrame) -> list[str]:
    """The transfer section of ``leaderboard.md`` (lines)."""
    blocks = transfer_blocks(table)
    if not blocks:
        return []
    lines = ["# Cross-dataset transfer", "", TRANSFER_NOTE, ""]
    for title, header, body in blocks:
        lines += [f"## {title}", "", pd.DataFrame(body, columns=header).to_markdown(index=False), ""]
    return lines


def write(results: list[CellResult], out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    md_path, csv_path = out_dir / "leaderboard.md", out_dir / "leaderboard.csv"
    table = robustness_table(results) if any(r.key.corruption is not None for r in results) else pd.DataFrame()
    inflation = inflation_table(results)
    text = markdown(results, table)
    if not inflation.empty:
        text = text.rstrip("\n") + "\n\n" + "\n".join(inflation_markdown(inflation)).rstrip() + "\n"
    transfer = transfer_table(results)
    if not transfer.empty:
        text = text.rstrip("\n") + "\n\n" + "\n".join(transfer_markdown(transfer)).rstrip() + "\n"
        atomic_write(out_dir / "transfer.csv", transfer.to_csv(index=False, float_format="%.6f"))
    atomic_write(md_path, text)
    atomic_write(csv_path, summary_table(results).to_csv(index=False, float_format="%.6f"))
    if not table.empty:
        atomic_write(out_dir / "robustness.csv", table.to_csv(index=False, float_format="%.6f"))
    if not inflation.empty:
        atomic_write(out_dir / "inflation.csv", inflation.to_csv(index=False, float_format="%.6f"))
    return md_path, csv_path
