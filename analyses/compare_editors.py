"""Compare editors on the same held-out facts: no edit, FT, FT-L, IKE (with and without
demonstrations), ROME and MEND (when a trained editor exists), on the default model.

Every number comes from ``ie.evaluate`` (the shared metrics; IKE is scored on
``edit.wrap(prompt)``): efficacy, paraphrase, neighbourhood and unchanged top-1 on the first
``--n`` CounterFact-val records the model knows (the harness skips the others, identically for
every method); reverse and portability (accuracy and the probability gap new - old) and fluency
on the first ``--probes`` records of the model's probe set (``load_probes(model.name)``, built
from the data by ``analyses/build_probes.py``).

    python analyses/compare_editors.py                 # --n 200: the README table and chart
    python analyses/compare_editors.py --n 5           # a quick run
    python analyses/compare_editors.py --mend-editor mend.safetensors
    python analyses/compare_editors.py --n 30 --out figures/ike_demos --probes 0 \\
        --variant "IKE 0=ike:demos=0" --variant "IKE 8=ike:demos=8" ...   # a sweep
    python analyses/compare_editors.py --from-reports results/compare_editors   # redraw only

Writes ``<out>.md`` (table) and ``<out>.png`` (chart). Each variant's per-record reports go to
``results/<out name>/`` as soon as it is done: a rerun with the same settings reuses them, a
rerun with a larger ``--n`` or ``--probes`` goes on from them (``evaluate(resume=...)``), an
interrupted comparison resumes, and ``--from-reports`` redraws without computing.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.ticker import NullFormatter

import interp_edit as ie
from interp_edit.cli import enable_ctrl_c
from interp_edit.editing import make_hparams
from interp_edit.evaluation import EvalReport, load_probes
from interp_edit.plotting.style import TEXT_WIDTH, new_figure, save_figure, style

ROOT = Path(__file__).resolve().parents[1]
VAL = ROOT.parent / "shared" / "data" / "counterfact-val.json"
os.environ.setdefault("INTERP_EDIT_DATA", str(VAL.parent))  # IKE's default pool
DEFAULT_VARIANTS = ("no edit=none", "FT=ft", "FT-L=ft-l", "IKE, no demos=ike:demos=0",
                    "IKE=ike", "ROME=rome", "MEND=mend")
# (column, which records it is measured on, heading)
COLUMNS = (("efficacy", "val", "efficacy"), ("paraphrase", "val", "paraphrase"),
           ("neighborhood", "val", "neighbourhood"), ("unchanged_top1", "val", "unchanged top-1"),
           ("reverse", "probes", "reverse"), ("reverse_gap", "probes", "reverse gap"),
           ("portability", "probes", "portability"),
           ("portability_gap", "probes", "portability gap"), ("fluency", "probes", "fluency"))


@dataclass(frozen=True)
class Variant:
    """One row of the table: a label, a registered method and its hparams."""

    label: str
    method: str
    hparams: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        """``"LABEL=method"`` or ``"LABEL=method:key=value;key=value"`` (values as Python
        literals, else strings), e.g. ``"IKE 8=ike:demos=8;mix=(4,4,8)"``."""
        label, sep, rest = spec.partition("=")
        if not sep or not rest:
            raise SystemExit(f"bad --variant {spec!r}: use LABEL=method[:key=value;...]")
        method, _, args = rest.partition(":")
        hp = {}
        for item in filter(None, args.split(";")):
            key, _, value = item.partition("=")
            try:
                hp[key.strip()] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                hp[key.strip()] = value
        return cls(label.strip(), method.strip(), hp)

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")


@dataclass(frozen=True)
class Result:
    variant: Variant
    val: EvalReport
    probes: EvalReport | None

    def summary(self, column: str, where: str):
        report = self.val if where == "val" else self.probes
        return report.summary(column) if report is not None else None


# ---- running (each variant's reports are saved as soon as they exist) ----------------------
def run_variant(model, variant: Variant, val, probes, args, folder: Path) -> Result:
    """Evaluate one variant, or reload it from ``folder`` when a run with the same method,
    hparams and sizes (or more facts) is already there, so an interrupted comparison
    resumes."""
    done = _load_result(folder, variant)
    if done is not None and _matches(done, args):
        print(f"{variant.label}: reusing {folder}/{variant.slug}-*.json", flush=True)
        return Result(variant, done.val.head(args.n, val),
                      done.probes and done.probes.head(args.probes, probes))
    kw = dict(method=variant.method, seed=args.seed, progress=not args.quiet,
              n_unrelated=args.n_unrelated, **variant.hparams)
    grow = done is not None and _same_settings(done, args)  # go on from the saved rows
    t0 = time.perf_counter()
    result = Result(variant,
                    ie.evaluate(model, val, n=args.n, resume=done.val if grow else None, **kw),
                    ie.evaluate(model, probes, n=args.probes, fluency=args.fluency,
                                resume=done.probes if grow else None, **kw)
                    if args.probes != 0 else None)
    print(f"{variant.label}: {result.val.headline()} ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    result.val.save(folder / f"{variant.slug}-val.json")
    if result.probes is not None:
        result.probes.save(folder / f"{variant.slug}-probes.json")
    return Result(variant, result.val.head(args.n, val),
                  result.probes and result.probes.head(args.probes, probes))


def _matches(done: Result, args) -> bool:
    probes_ok = (done.probes is None) == (args.probes == 0) and (
        done.probes is None or (_covers(done.probes.info["n_requested"], args.probes)
                                and (done.probes.info["fluency_tokens"] is not None)
                                == args.fluency))
    unrelated = len(done.val.info.get("unrelated_prompts", ())) == args.n_unrelated
    whole = not any(r is not None and r.info.get("interrupted") for r in (done.val, done.probes))
    return (_covers(done.val.info["n_requested"], args.n) and done.val.seed == args.seed
            and unrelated and probes_ok and whole)


def _same_settings(done: Result, args) -> bool:
    """Whether the saved reports were made with these settings, so a larger run can resume
    them (the harness checks the rest: model, hparams, unrelated prompts)."""
    fluency = done.probes is None or (done.probes.info["fluency_tokens"] is not None) \
        == args.fluency
    return (done.val.seed == args.seed and fluency and (done.probes is None) == (args.probes == 0)
            and len(done.val.info.get("unrelated_prompts", ())) == args.n_unrelated)


def _covers(saved: int | None, wanted: int | None) -> bool:
    """A saved run of ``saved`` records (None: all) holds the first ``wanted`` ones."""
    return saved is None if wanted is None else saved is None or saved >= wanted


def _load_result(folder: Path, variant: Variant, check: bool = True) -> Result | None:
    val, probes = folder / f"{variant.slug}-val.json", folder / f"{variant.slug}-probes.json"
    if not val.exists():
        return None
    report = EvalReport.load(val)
    if check and (report.method != variant.method or report.hparams != _full_hparams(variant)):
        return None
    return Result(variant, report, EvalReport.load(probes) if probes.exists() else None)


def _full_hparams(variant: Variant) -> dict[str, Any]:
    """The variant's hparams with the editor's current defaults filled in, as saved in JSON."""
    if variant.method == "none":
        return {}
    hp = dataclasses.asdict(make_hparams(variant.method, **variant.hparams))
    return json.loads(json.dumps(hp, default=str))


def mend_available(model, editor: str | None) -> tuple[bool, str]:
    if editor:
        return Path(editor).is_file(), editor
    try:
        from interp_edit.editing.mend import default_editor_path
    except ImportError as exc:
        return False, f"MEND is not available ({exc})"
    path = default_editor_path(model)
    return path.is_file(), str(path)


def save_index(results: Sequence[Result], folder: Path, notes: Sequence[str]) -> None:
    index = {"variants": [{"label": r.variant.label, "method": r.variant.method,
                           "hparams": r.variant.hparams} for r in results], "notes": list(notes)}
    (folder / "variants.json").write_text(json.dumps(index, indent=1, default=str))


def load_index(folder: Path) -> tuple[list[Result], list[str]]:
    index = json.loads((folder / "variants.json").read_text())
    variants = [Variant(v["label"], v["method"], v["hparams"]) for v in index["variants"]]
    return [_load_result(folder, v, check=False) for v in variants], index["notes"]


# ---- the table and the chart ---------------------------------------------------------------
def table(results: Sequence[Result], notes: Sequence[str] = ()) -> str:
    """Markdown: one row per variant, each metric as mean [95% CI], and the time it costs."""
    cols = [c for c in COLUMNS if any(r.summary(c[0], c[1]) for r in results)]
    head = ["method", "hparams", "val n", *[h for _, _, h in cols], "s / edit", "eval s / fact"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in results:
        hp = ", ".join(f"{k}={v}" for k, v in r.variant.hparams.items())
        cells = [r.variant.label, hp or "defaults", str(r.val.n)]
        for col, where, _ in cols:
            s = r.summary(col, where)
            cells.append("" if s is None else f"{s.mean:.2f} [{s.lo:.2f}, {s.hi:.2f}]")
        sec = r.val.summary("seconds")
        cells.append(f"{sec.mean:.2f}" if sec and r.variant.method != "none" else "")
        cells.append(f"{r.val.info['seconds_total'] / max(r.val.n, 1):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + _caption(results, cols) + "".join(
        f"\n\n{n}" for n in notes) + "\n"


def _caption(results: Sequence[Result], cols) -> str:
    first, named = results[0], {c for c, _, _ in cols}
    val = [h for c, w, h in cols if w == "val"]
    probe = [h for c, w, h in cols if w == "probes"]
    text = (f"Model: {first.val.model_name}. {', '.join(val).capitalize()} on the first "
            f"{first.val.n} "
            f"CounterFact-val facts the model knows (the same facts for every method; "
            f"skipped as not known: {len(first.val.skipped)})")
    if probe and first.probes is not None:
        text += (f"; {', '.join(probe)} on the first {first.probes.n} facts of the model's "
                 "probe set (built from CounterFact and known_1000 by analyses/build_probes.py)")
    text += (". Mean and 95% bootstrap CI over facts. Efficacy, paraphrase: p(new) > p(true); "
             "neighbourhood: p(true) > p(new) on other subjects' prompts")
    if "reverse" in named or "portability" in named:
        text += ("; reverse, portability: teacher-forced token accuracy of the answer after the "
                 "edit; gap: p(answer after) - p(answer before)")
    if "fluency" in named:
        text += "; fluency: ROME's n-gram entropy of greedy generations (bits)"
    return text + (". s / edit: computing and applying one edit; eval s / fact: wall time of "
                   "the whole evaluation per fact, which is where IKE's long context costs "
                   "(every query carries it). CPU, shared machine: compare times within a "
                   "table only.")


def chart(results: Sequence[Result]):
    """Grouped bars of the [0, 1] metrics with 95% CIs, and wall time per fact (log scale)."""
    cols = [c for c in COLUMNS if c[0] != "fluency" and not c[0].endswith("_gap")
            and any(r.summary(c[0], c[1])
                                                             for r in results)]
    with style():
        fig = new_figure(TEXT_WIDTH, 2.4)
        ax, ax_t = fig.subplots(1, 2, width_ratios=[4.2, 1])
        width = 0.8 / len(results)
        colors = [f"C{i}" for i in range(len(results))]
        for i, r in enumerate(results):
            xs, means, errs = [], [], [[], []]
            for j, (col, where, _) in enumerate(cols):
                s = r.summary(col, where)
                if s is None:
                    continue
                xs.append(j + (i - (len(results) - 1) / 2) * width)
                means.append(s.mean)
                errs[0].append(s.mean - s.lo)
                errs[1].append(s.hi - s.mean)
            ax.bar(xs, means, width, yerr=np.array(errs), color=colors[i], label=r.variant.label,
                   error_kw={"elinewidth": 0.6, "capsize": 1.2})
        ax.set_xticks(range(len(cols)), [h.replace(" ", "\n").replace("neighbourhood",
                                                                        "neighbour-\nhood")
                                          for _, _, h in cols])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("score (mean, 95% CI)")
        ax.legend(ncol=min(4, len(results)), loc="upper center", bbox_to_anchor=(0.5, 1.25))
        for i, r in enumerate(results):  # edit + measuring: IKE pays for its context here
            ax_t.barh(i, r.val.info["seconds_total"] / max(r.val.n, 1), color=colors[i])
        ax_t.set_yticks(range(len(results)), [r.variant.label for r in results])
        ax_t.set_xscale("log")
        ax_t.xaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels collide
        ax_t.invert_yaxis()
        ax_t.set_xlabel("s / fact (edit + eval)")
    return fig


# ---- main ----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="CounterFact-val facts per method")
    p.add_argument("--probes", type=int, default=None,
                   help="probe facts per method (default: all; 0: skip the probe set)")
    p.add_argument("--data", default=str(VAL), help="CounterFact file of held-out facts")
    p.add_argument("--mend-editor", default=None, help="a trained MEND editor file")
    p.add_argument("--variant", action="append", default=None,
                   help="LABEL=method[:key=value;...] (repeat; default: every editor)")
    p.add_argument("--no-fluency", dest="fluency", action="store_false",
                   help="skip fluency (greedy generation is the slowest metric)")
    p.add_argument("--n-unrelated", type=int, default=10,
                   help="unrelated prompts per record for unchanged top-1 (0: skip, faster)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "figures" / "compare_editors"),
                   help="output stem: writes <out>.md and <out>.png")
    p.add_argument("--from-reports", default=None,
                   help="redraw from the reports saved in this folder, computing nothing")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    enable_ctrl_c()  # Ctrl-C keeps what was measured
    out = Path(args.out)
    notes: list[str] = []

    folder = Path(args.from_reports) if args.from_reports else ROOT / "results" / out.name
    if args.from_reports:
        results, notes = load_index(folder)
    else:
        model = ie.load_model()
        variants = [Variant.parse(s) for s in (args.variant or DEFAULT_VARIANTS)]
        if any(v.method == "mend" for v in variants):
            ok, where = mend_available(model, args.mend_editor)
            if ok and args.mend_editor:
                variants = [Variant(v.label, v.method, {"editor": args.mend_editor})
                            if v.method == "mend" else v for v in variants]
            elif not ok:
                variants = [v for v in variants if v.method != "mend"]
                notes.append(f"MEND: no trained editor at {where}; train one "
                             "(analyses/train_mend.py) or pass --mend-editor.")
        val = ie.load_counterfact(args.data)
        probes = load_probes(model.name)
        results = [run_variant(model, v, val, probes, args, folder) for v in variants]
        save_index(results, folder, notes)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = table(results, notes)
    out.with_suffix(".md").write_text(text)
    save_figure(chart(results), out, formats=("png",))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
