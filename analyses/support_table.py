"""The README's support table: which method works on which decoder family, found by running
every per-family check of ``tests/unit/test_families.py`` on a tiny random model of each family
(:mod:`interp_edit.arch.tiny`) and reading the outcomes. A cell is ✓ when every check of that
capability passed for that family, ✗ otherwise (with the number that failed); "fast path"
says whether the layer stepper runs the family (else tracing and editing go through hooks:
still exact, slower).

    python analyses/support_table.py            # print the table
    python analyses/support_table.py --write    # and put it into README.md between its markers
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests" / "unit" / "test_families.py"
README = ROOT / "README.md"
BEGIN, END = "<!-- support-table: analyses/support_table.py --write -->", "<!-- /support-table -->"
# capability column -> the checks (test functions of TESTS) that must all pass
COLUMNS = {
    "trace fast = reference": ("test_fast_equals_reference",),
    "screen (first order)": ("test_attribution_is_first_order_exact",),
    "ROME (W′k* = v*)": ("test_rome_writes_v_star_where_the_matrix_writes",),
    "MEND (factors = ∇W)": ("test_mend_factors_are_the_weight_gradient",),
    "resume top blocks": ("test_top_blocks_rerun_give_the_full_logits",),
    "FT / FT-L": ("test_finetune_runs_and_undoes_bit_exact",),
    "IKE": ("test_ike_runs",),
    "save / load": ("test_edits_saved_with_wrapped_names_still_load",),
}


class Outcomes:
    """A pytest plugin that records each check's outcome by (family, test function)."""

    def __init__(self) -> None:
        self.family: dict[str, str] = {}
        self.failed: dict[tuple[str, str], int] = defaultdict(int)
        self.ran: dict[tuple[str, str], int] = defaultdict(int)

    def pytest_collection_modifyitems(self, items) -> None:
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            if "model" in params:
                self.family[item.nodeid] = params["model"]

    def pytest_runtest_logreport(self, report) -> None:
        family = self.family.get(report.nodeid)
        if family is None or (report.when != "call" and report.passed):
            return
        key = (family, report.nodeid.split("::")[-1].split("[")[0])
        if report.when == "call" or report.failed:
            self.ran[key] += 1
            self.failed[key] += int(report.failed)


def table(outcomes: Outcomes, fast: dict[str, bool]) -> str:
    """The markdown table: one row per family, one column per capability."""
    families = sorted(set(outcomes.family.values()))
    head = "| family | fast path | " + " | ".join(COLUMNS) + " |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for fam in families:
        cells = []
        for checks in COLUMNS.values():
            ran = sum(outcomes.ran[(fam, c)] for c in checks)
            failed = sum(outcomes.failed[(fam, c)] for c in checks)
            cells.append("–" if not ran else "✓" if not failed else f"✗ ({failed}/{ran})")
        rows.append(f"| {fam} | {'yes' if fast[fam] else 'no (hooks)'} | " + " | ".join(cells)
                    + " |")
    return "\n".join(rows)


def write_readme(text: str) -> None:
    """Replace the table between the README's markers (atomically)."""
    readme = README.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(readme):
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block to fill")
    tmp = README.with_name(f".README.{os.getpid()}.tmp")
    tmp.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", readme))
    os.replace(tmp, README)


def main() -> None:
    import pytest

    from interp_edit.arch.stepper import Stepper
    from interp_edit.arch.tiny import TINY_FAMILIES, tiny_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="put the table into README.md")
    args = ap.parse_args()
    outcomes = Outcomes()
    code = pytest.main([str(TESTS), "-q", "-p", "no:cacheprovider", "--no-header", "-rN"],
                       plugins=[outcomes])
    if code not in (0, 1):  # 1: some check failed, which the table shows
        raise SystemExit(f"pytest could not run {TESTS} (exit code {code})")
    fast = {fam: Stepper.usable(tiny_model(fam)) for fam in TINY_FAMILIES}
    text = table(outcomes, fast)
    print(text)
    if args.write:
        write_readme(text)
        print(f"wrote the table into {README.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
