"""The README's study tables, read from the reports that the studies' commands wrote under
``results/studies/`` (``interp-edit evaluate ... --out results/studies/<study>/<model>/<method>-report``):
one row per model and method, mean [95% CI] (n) of each metric, computing nothing.

    python analyses/study_tables.py                     # every study found
    python analyses/study_tables.py --study probes
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "results" / "studies"
# each method's table label, in table order
LABELS = {"none": "no edit", "ft": "FT", "ft-l": "FT-L", "ike": "IKE", "rome": "ROME",
          "mend": "MEND", "memit": "MEMIT", "alphaedit": "AlphaEdit"}
METHODS = tuple(LABELS)
COLUMNS = {
    "editors": ("efficacy", "paraphrase", "neighborhood", "unchanged_top1"),
    "probes": ("efficacy", "paraphrase", "neighborhood", "reverse", "reverse_gap",
               "portability", "portability_gap"),
}


def _cell(agg: dict, metric: str, show_n: bool) -> str:
    m = agg.get(metric)
    if not m or m.get("mean") is None:
        return ""
    if m.get("lo") is None:
        return f"{m['mean']:.3f}"
    n = f" (n={m['n']})" if show_n else ""
    return f"{m['mean']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]{n}"


def table(study: str) -> list[str]:
    cols = COLUMNS.get(study, COLUMNS["editors"])
    lines = [f"| model | method | records | {' | '.join(cols)} |",
             "|---|---|---|" + "---|" * len(cols)]
    for model_dir in sorted((ROOT / study).iterdir()):
        reports = {p.name.removesuffix("-report"): p for p in model_dir.glob("*-report")}
        for method in sorted(reports, key=lambda m: (METHODS.index(m) if m in METHODS else 99, m)):
            files = list(reports[method].glob("*.json"))
            if not files:
                continue
            rep = json.loads(files[0].read_text())
            agg, n = rep["aggregate"], len(rep["rows"])
            cells = " | ".join(_cell(agg, c, study == "probes" and c.startswith(("rev", "port")))
                               for c in cols)
            name = LABELS.get(method, method)
            lines.append(f"| {model_dir.name} | {name} | {n} | {cells} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", choices=sorted(COLUMNS), default=None)
    args = ap.parse_args()
    for study in [args.study] if args.study else sorted(p.name for p in ROOT.iterdir()):
        print(f"### {study}\n")
        print("\n".join(table(study)), "\n")


if __name__ == "__main__":
    main()
