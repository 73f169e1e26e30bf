"""The explanation files ``hica-bench explain`` writes (``OUT/explanations/<cell>/explanation.json``, schema
:data:`SCHEMA`), as the report and the CLI read and show them. Making them is :mod:`hica_bench.explain`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GRID = 7  #: patches per side for occlusion and the deletion/insertion curves
SCHEMA = 1  #: version of explanation.json


def mean_se(mean: float, se: float | None) -> str:
    """An AUC as the CLI and the report show it: mean ± standard error (the mean alone for one image)."""
    return f"{mean:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def versus_random(row: dict[str, Any]) -> str:
    """``row``'s paired differences from the random order, as text (empty for the random order itself)."""
    if row["attribution"] == "random":
        return "(reference)"
    parts = []
    for curve, short in (("deletion_auc", "deletion"), ("insertion_auc", "insertion")):
        difference, p = row.get(curve + "_vs_random"), row.get(curve + "_vs_random_p")
        if difference is not None:
            parts.append(f"{short} {difference:+.3f}" + (f" (p={p:.2g})" if p is not None else ""))
    return ", ".join(parts)


def read_all(out_dir: Path) -> list[dict[str, Any]]:
    """Every ``explanation.json`` under ``out_dir/explanations/`` (for the report), with its folder relative to
    ``out_dir``; unreadable ones are left out."""
    found = []
    for path in sorted(Path(out_dir).glob("explanations/*/explanation.json")):
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(document, dict) and document.get("schema") == SCHEMA:
            document["folder"] = path.parent.relative_to(out_dir).as_posix()
            found.append(document)
    return found
