"""Results -> pandas -> leaderboard tables (Markdown for people, CSV for tools).

Per dataset and encoder: one row per method, one column per shot count, cells ``mean ± std (n)``
over seeds, in percent, for ACC and AUC. Methods that do not apply are listed with their reason.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from hica_bench.metrics import METRICS, aggregate
from hica_bench.results import CellResult


#: per-cell timings of the encoder pass: the harness's images/s and the plain eager forward's, measured in the same
#: run (``hica-bench check`` compares their ratio)
THROUGHPUT = ("encoder_images_per_s", "reference_images_per_s")


def results_frame(results: list[CellResult]) -> pd.DataFrame:
    rows = []
    for r in results:
        row = {**r.key.__dict__, "status": r.status, "reason": r.reason, **(r.metrics or {})}
        row["fit_s"] = r.timings.get("fit_s")
        for timing in THROUGHPUT:
            row[timing] = r.timings.get(timing, float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)


def summary_table(results: list[CellResult]) -> pd.DataFrame:
    """One row per (dataset, size, encoder, method, k, max_test): mean/std/n of every metric over seeds."""
    frame = results_frame([r for r in results if r.status == "ok"])
    if frame.empty:
        return frame
    group = ["dataset", "size", "encoder", "method", "k", "max_test"]
    rows = []
    for keys, part in frame.groupby(group, dropna=False, sort=True):
        row = dict(zip(group, keys))
        for metric in METRICS:
            stats = aggregate(part[metric])
            row[f"{metric}_mean"], row[f"{metric}_std"], row["n"] = stats["mean"], stats["std"], stats["n"]
        row["seeds"] = ",".join(str(s) for s in sorted(part["seed"]))
        row["fit_s_mean"] = part["fit_s"].mean()
        for timing in THROUGHPUT:
            row[f"{timing}_mean"] = pd.to_numeric(part[timing], errors="coerce").mean()
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(mean: float, std: float, n: int) -> str:
    if mean != mean:
        return "n/a"
    return f"{100 * mean:.1f} ± {100 * std:.1f} ({n})"


def _cost(part: pd.DataFrame, extraction: str | None) -> str:
    """One line: encoder images/s (with how it ran, and × the plain eager forward) and each method's mean fit seconds."""
    ips, ref = part["encoder_images_per_s_mean"].mean(), part["reference_images_per_s_mean"].mean()
    encoder = "encoder features from the cache (no images/s measured)" if ips != ips else f"encoder {ips:.1f} images/s"
    if ips == ips and extraction:
        encoder += f" ({extraction})"
    if ips == ips and ref == ref:
        encoder += f", {ips / ref:.2f}× the plain eager forward"
    fits = part.groupby("method", sort=True)["fit_s_mean"].mean()
    return f"Cost: {encoder}; fit seconds per cell (mean): " + ", ".join(f"{m} {s:.3g}" for m, s in fits.items())


def _extraction(settings: dict | None) -> str | None:
    if not settings:
        return None
    layout = ", channels-last" if settings.get("channels_last") else ""
    return f"{settings['backend']}, batch {settings['batch_size']}{layout}, {settings['threads']} threads, {settings['precision']}"


def markdown(results: list[CellResult]) -> str:
    summary = summary_table(results)
    lines = ["# hica-bench leaderboard", "", "Percent, mean ± sample std over seeds (n seeds). AUC follows medmnist's convention.", ""]
    not_applicable = {(r.key.dataset, r.key.encoder, r.key.method): r.reason for r in results if r.status == "not_applicable"}
    failed = sum(r.status == "failed" for r in results)
    extraction = {(r.key.dataset, r.key.encoder): _extraction(r.environment.get("extraction"))
                  for r in sorted(results, key=lambda r: r.finished_at or "") if "encoder_images_per_s" in r.timings}
    blocks = summary.groupby(["dataset", "size", "encoder", "max_test"], dropna=False, sort=True) if not summary.empty else []
    for (dataset, size, encoder, max_test), part in blocks:
        test = "full test split" if pd.isna(max_test) else f"first {int(max_test)} test images"
        lines += [f"## {dataset} ({size} px) — encoder `{encoder}`, {test}", "", _cost(part, extraction.get((dataset, encoder))), ""]
        for metric in ("acc", "auc"):
            table = part.pivot(index="method", columns="k", values=f"{metric}_mean")
            text = table.copy().astype(object)
            for (_, row) in part.iterrows():
                text.loc[row["method"], row["k"]] = _cell(row[f"{metric}_mean"], row[f"{metric}_std"], int(row["n"]))
            text = text.fillna("—")
            text.columns = [f"{k}-shot" for k in text.columns]
            lines += [f"**{metric.upper()}**", "", text.reset_index().to_markdown(index=False), ""]
        skipped = [(m, why) for (d, e, m), why in not_applicable.items() if d == dataset and e == encoder]
        for method, why in sorted(skipped):
            lines.append(f"- `{method}`: not applicable — {why}")
        if skipped:
            lines.append("")
    for (dataset, encoder, method), why in sorted(not_applicable.items()):
        if summary.empty or not ((summary["dataset"] == dataset) & (summary["encoder"] == encoder)).any():
            lines.append(f"- {dataset} / `{encoder}` / `{method}`: not applicable — {why}")
    if failed:
        lines += ["", f"{failed} cell(s) failed; see the results file for their errors."]
    return "\n".join(lines).rstrip() + "\n"


def write(results: list[CellResult], out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out_dir / "leaderboard.md", out_dir / "leaderboard.csv"
    md_path.write_text(markdown(results))
    summary_table(results).to_csv(csv_path, index=False, float_format="%.6f")
    return md_path, csv_path
