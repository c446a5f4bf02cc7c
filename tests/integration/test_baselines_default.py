"""IKE, FT and FT-L on the default model, scored by the shared harness (``ie.evaluate``)."""

import pytest
import torch

import interp_edit as ie
from interp_edit.editing import ike

pytestmark = pytest.mark.integration
N = 6  # CounterFact-val facts the model knows


@pytest.fixture(scope="module")
def records(shared_data):
    return ie.load_counterfact(shared_data / "counterfact-val.json")[:40]


@pytest.fixture(scope="module")
def pool(shared_data):
    path = shared_data / "counterfact-train.json"
    assert ike.pool_path(None).resolve() == path.resolve()  # the default pool
    return str(path)


def _run(model, records, method, **hp):
    return ie.evaluate(model, records, method, n=N, progress=False, n_unrelated=0, **hp)


def test_ike_raises_p_new_on_the_edit_prompt(default_model, records, pool):
    base = _run(default_model, records, "none")
    for hp in ({"demos": 0}, {}):  # the bare new fact, and the default demonstrations
        report = _run(default_model, records, "ike", pool=pool, **hp)
        assert [r["case_id"] for r in report.rows] == [r["case_id"] for r in base.rows]
        assert report.summary("efficacy_gap").mean > base.summary("efficacy_gap").mean + 0.1
        assert report.summary("efficacy").mean > base.summary("efficacy").mean + 0.4


def test_retain_demonstrations_protect_locality(default_model, records, pool):
    """Told a new fact alone, the small model applies it to neighbours too; demonstrations that
    answer an unrelated prompt with its old answer keep the neighbours' true answers ahead."""
    bare = _run(default_model, records, "ike", pool=pool, demos=0)
    retain = _run(default_model, records, "ike", pool=pool, demos=8, mix=(0, 0, 1))
    assert retain.summary("neighborhood_gap").mean > bare.summary("neighborhood_gap").mean + 0.1
    assert retain.summary("neighborhood").mean > bare.summary("neighborhood").mean


def test_ike_context_fits_and_undo_drops_it(default_model, records, pool):
    rec = records[0]
    e = ie.edit(default_model, [rec.request], method="ike", pool=pool)
    assert len(e.info["demonstrations"]) == ike.IKEHparams().demos
    assert e.info["context_tokens"] < default_model.n_ctx // 8
    e.undo()
    assert not e.applied and e.context  # the record keeps its context; the model is untouched


@pytest.mark.parametrize("method", ["ft", "ft-l"])
def test_ft_edits_and_undo_is_bit_exact(default_model, records, method):
    m = default_model
    before = {k: v.detach().clone() for k, v in m.hf_model.named_parameters()}
    report = _run(m, records[:10], method)
    assert report.n >= 1
    if method == "ft":
        assert report.summary("efficacy").mean == 1.0
    rec = records[0]
    with ie.edit(m, [rec.request], method=method) as e:
        if method == "ft-l":
            (delta,) = e.deltas.values()
            assert delta.abs().max() <= e.hparams["norm_constraint"]
    assert all(torch.equal(before[k], v) for k, v in m.hf_model.named_parameters())
