"""Build the reverse and portability probe set of a model from the shared data.

    python analyses/build_probes.py                         # the default model
    python analyses/build_probes.py --model gemma-3-270m    # another built-in model

Edits come from counterfact-val, then counterfact-edit (never counterfact-train, which IKE
draws its demonstrations from and MEND trains on); the facts that give the inverse answers and
the hops come from all three CounterFact files and known_1000. Which hops the model knows, and
which edits it knows, depend on the model, so each model has its own set. The set goes to
``interp_edit/evaluation/probe_sets/<model>.json`` (where ``ie.load_probes(model.name)`` finds
it) with the settings and the data files' digests; the script prints its counts.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

import interp_edit as ie
from interp_edit._cache import file_digest
from interp_edit.evaluation.datasets import probe_set_path
from interp_edit.evaluation.probe_builder import (
    KnowledgeBase, ProbeSettings, build_probes, facts_from_known, facts_from_records,
    save_probe_set)
from interp_edit.evaluation.probe_schema import COUNTERFACT

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
EDIT_FILES = ("counterfact-val.json", "counterfact-edit.json")
FACT_FILES = ("counterfact-val.json", "counterfact-edit.json", "counterfact-train.json")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a built-in model name (default: the default)")
    p.add_argument("--data", default=str(DATA), help="folder of the shared data files")
    p.add_argument("--max-hops", type=int, default=2, help="known facts chained after the edit")
    p.add_argument("--out", default=None, help="JSON path (default: the package's probe_sets/)")
    args = p.parse_args(argv)
    data = Path(args.data)
    model = ie.load_model(args.model)
    cf = {f: ie.load_counterfact(data / f) for f in FACT_FILES}
    known = ie.load_known_facts(data / "known_1000.json")
    kb = KnowledgeBase.build([*(x for f in FACT_FILES for x in facts_from_records(cf[f])),
                              *facts_from_known(known)])
    settings = ProbeSettings(max_hops=args.max_hops)
    edits = [r for f in EDIT_FILES for r in cf[f]]
    records = build_probes(model, edits, kb, COUNTERFACT, settings)
    sources = {"edits": list(EDIT_FILES), "facts": [*FACT_FILES, "known_1000.json"],
               "digests": {f: file_digest(data / f)
                           for f in (*FACT_FILES, "known_1000.json")}}
    out = save_probe_set(args.out or probe_set_path(model.name), records, model.name, settings,
                         sources)
    rel = Counter(COUNTERFACT.relation_of(r.prompt) for r in records)
    rev = [r for r in records if r.reverse]
    port = [r for r in records if r.portability]
    hops = Counter(_hops(r, p[0]) for r in port for p in r.portability)
    print(f"{model.name}: {len(records)} records from {len(edits)} edits -> {out}")
    print(f"  reverse: {len(rev)} records; portability: {len(port)} records, "
          f"{sum(len(r.portability) for r in port)} probes (by hops: {dict(sorted(hops.items()))})")
    print(f"  relations: {dict(rel.most_common())}")
    return 0


def _hops(record, prompt: str) -> int:
    """How many known facts a portability prompt of ``record`` chains after the edit."""
    rid = COUNTERFACT.relation_of(record.prompt)
    return next(len(c) for c in COUNTERFACT.chains(rid)
                if COUNTERFACT.question(rid, c).replace("{}", record.subject) == prompt)


if __name__ == "__main__":
    sys.exit(main())
