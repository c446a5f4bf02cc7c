"""analyses/support_table.py: its columns name real per-family checks, and it turns outcomes
into the table (a failed check shows as ✗ with the count, a missing one as –)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("support_table",
                                                  ROOT / "analyses" / "support_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_column_names_a_per_family_check():
    st = _script()
    tests = set(re.findall(r"^def (test_\w+)\(model\b", st.TESTS.read_text(), re.MULTILINE))
    for checks in st.COLUMNS.values():
        assert set(checks) <= tests, checks


def test_outcomes_become_cells():
    st = _script()
    o = st.Outcomes()
    o.family = {"a": "gpt2", "b": "llama"}
    first = next(iter(st.COLUMNS.values()))[0]
    o.ran[("gpt2", first)], o.failed[("gpt2", first)] = 4, 1
    o.ran[("llama", first)] = 4
    rows = st.table(o, {"gpt2": False, "llama": True}).splitlines()
    assert rows[2].startswith("| gpt2 | no (hooks) | ✗ (1/4) | –")
    assert rows[3].startswith("| llama | yes | ✓ | –")
    assert len(rows[0].split("|")) == len(st.COLUMNS) + 4
