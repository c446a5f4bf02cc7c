"""Measuring edits: datasets (one record type), metrics (one definition each), and ``evaluate``.

    import interp_edit as ie
    records = ie.load_counterfact("../shared/data/counterfact-val.json")
    report = ie.evaluate(model, records, method="rome", n=200)
    print(report.to_markdown()); report.save("results/")

``method="none"`` gives the no-edit baseline in the same table (``summary_table``).
"""

from interp_edit.evaluation import metrics
from interp_edit.evaluation.datasets import load_counterfact, load_probes, load_zsre
from interp_edit.evaluation.harness import evaluate
from interp_edit.evaluation.known_facts import KnownFact, load_known_facts
from interp_edit.evaluation.records import EditRecord
from interp_edit.evaluation.report import EvalReport, Summary, summary_table

__all__ = [
    "EditRecord",
    "EvalReport",
    "KnownFact",
    "Summary",
    "evaluate",
    "load_counterfact",
    "load_known_facts",
    "load_probes",
    "load_zsre",
    "metrics",
    "summary_table",
]
