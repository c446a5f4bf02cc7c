"""MEMIT and AlphaEdit on the tiny fact model and on small matrices: ROME is MEMIT's
one-fact one-layer case, the closed forms solve their objectives, AlphaEdit protects the keys
of earlier edits, streams undo bit for bit, and bad batches fail before any weight changes."""

import pytest
import torch

import interp_edit as ie
from interp_edit.arch import adapter
from interp_edit.editing import keys, memit, rome, update
from interp_edit.editing.stats import second_moment
from interp_edit.errors import InterpEditError
from interp_edit.testing import CITIES, fact_model, wrap_tiny


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("INTERP_EDIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def HP(fact_corpus):
    """Settings for the 4-layer fact model (as ROME's tests: no prefixes, its own sentences
    as the statistics corpus; layers from 0, where its facts can be rewritten)."""
    return dict(n_prefixes=0, v_steps=100, v_nll_stop=0.01, v_weight_decay=0.01, v_lr=1.0,
                corpus=str(fact_corpus), stats_tokens=2000, precision="fp32")


def _city_requests(fm, shift=1):
    out = []
    for f in fm.facts:
        if f.relation == "city":
            i = CITIES.index(f.attribute)
            out.append(ie.EditRequest(f.template, f.subject, CITIES[(i + shift) % len(CITIES)],
                                      f.attribute))
    return out


def _weights(model):
    return {k: v.detach().clone() for k, v in model.hf_model.named_parameters()}


def _same(model, before):
    return all(torch.equal(before[k], v) for k, v in _weights(model).items())


def test_one_fact_one_layer_memit_is_rome(fm, HP):
    """The same k*, v* and C: with λ = 0 MEMIT's ΔW is ROME's; with λ > 0 it is ROME's scaled
    by s / (λ + s), s = k*ᵀC⁻¹k* (the batch term's share against the preserved keys)."""
    m, req = fm.model, _city_requests(fm)[0]
    name = rome.parameter_name(m, m.mlp_out_proj(0))
    with ie.edit(m, req, method="rome", layer=0, **HP) as r:
        d_rome = r.deltas[name]
    with ie.edit(m, req, method="memit", layers=(0,), mom2_update_weight=0.0, **HP) as e:
        torch.testing.assert_close(e.deltas[name], d_rome, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(e.keys[name], r.keys[name])
    lam = 0.5
    with ie.edit(m, req, method="memit", layers=(0,), mom2_update_weight=lam, **HP) as e:
        k = r.keys[name][0].double()
        c = second_moment(m, 0, HP["corpus"], HP["stats_tokens"], precision="fp32").double()
        c = c + 1e-4 * c.diagonal().mean() * torch.eye(len(c), dtype=c.dtype)
        s = float(k @ torch.linalg.solve(c, k))
        torch.testing.assert_close(e.deltas[name], d_rome * (s / (lam + s)), rtol=1e-4, atol=1e-6)


def test_memit_update_solves_its_objective():
    g = torch.Generator().manual_seed(0)
    d_out, d, n = 6, 12, 4
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    c = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    k = torch.randn(d, n, generator=g, dtype=torch.float64)
    r = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    exact = update.memit_update(r, k, c)  # λ = 0: the batch's keys get exactly R
    torch.testing.assert_close(exact @ k, r)
    lam = 3.0
    dw = update.memit_update(r, k, c, weight=lam)
    torch.testing.assert_close(dw, r @ k.T @ torch.linalg.inv(lam * c + k @ k.T))


def test_alphaedit_update_stays_in_the_null_space():
    """Keys of C's corpus, held out or not, keep their outputs exactly when C is rank
    deficient; MEMIT's update (with its ridge) moves them; both write the batch's residual."""
    g = torch.Generator().manual_seed(1)
    d_out, d, rank, n = 5, 24, 10, 3
    basis = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))[0]
    corpus = basis @ torch.randn(rank, 400, generator=g, dtype=torch.float64)
    held_out = basis @ torch.randn(rank, 50, generator=g, dtype=torch.float64)
    c = corpus @ corpus.T / corpus.shape[1]
    k = torch.randn(d, n, generator=g, dtype=torch.float64)
    r = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    u = update.null_basis(c, 1e-6)
    assert u.shape[1] == d - rank
    dw = update.alphaedit_update(r, k, u, alpha=1e-9)
    assert (dw @ held_out).norm() < 1e-9 * r.norm() * held_out.norm()
    torch.testing.assert_close(dw @ k, r, rtol=1e-5, atol=1e-5)
    memit = update.memit_update(r, k, c, ridge=1e-4)
    torch.testing.assert_close(memit @ k, r)
    assert (memit @ held_out).norm() > 1e3 * (dw @ held_out).norm()
    # the protected keys of earlier edits enter the objective: their outputs move less
    p = torch.randn(d, 4, generator=g, dtype=torch.float64)
    loose = update.alphaedit_update(r, k, u, alpha=1e-3)
    kept = update.alphaedit_update(r, k, u, p, alpha=1e-3)
    assert (kept @ p).norm() < 0.5 * (loose @ p).norm()
    with pytest.raises(InterpEditError, match="no null space"):
        update.null_basis(torch.eye(d, dtype=torch.float64), 0.5)


def test_alphaedit_protects_earlier_edits_keys(fm, HP):
    """A second AlphaEdit batch barely moves the outputs of the first batch's keys (they are
    protected); a second MEMIT batch moves them more."""
    m = fm.model
    reqs = _city_requests(fm)
    name = rome.parameter_name(m, m.mlp_out_proj(0))
    moved = {}
    for method, extra in (("memit", dict(mom2_update_weight=0.0)),
                          ("alphaedit", dict(alpha=1e-3, null_threshold=0.1))):
        before = _weights(m)
        first = ie.edit(m, reqs[:4], method=method, layers=(0,), **HP, **extra)
        second = ie.edit(m, reqs[4:8], method=method, layers=(0,), **HP, **extra)
        if method == "alphaedit":
            assert second.info["protected_keys"] == {0: 4} and first.info["protected_keys"] == {0: 0}
        k1 = first.keys[name].T  # [d_mlp, 4]
        moved[method] = float((second.deltas[name] @ k1).norm() / (first.deltas[name] @ k1).norm())
        second.undo()
        first.undo()
        assert _same(m, before)
    assert moved["alphaedit"] < 0.25 * moved["memit"], moved


def test_stream_undo_is_bit_exact_and_save_roundtrip(fm, HP, tmp_path):
    m = fm.model
    reqs = _city_requests(fm, shift=2)
    before = _weights(m)
    stream = [ie.edit(m, reqs[i:i + 3], method=method, layers=(0, 1), **HP)
              for i, method in ((0, "memit"), (3, "alphaedit"), (6, "alphaedit"))]
    assert stream[2].info["protected_keys"] == {0: 6, 1: 6}
    assert stream[0].info["layers"] == [0, 1] and stream[0].info["why"] == "given (layers=[0, 1])"
    edited = _weights(m)
    stream[2].save(tmp_path / "a.safetensors")
    with pytest.raises(InterpEditError, match="reverse order"):
        stream[0].undo()
    for e in reversed(stream):
        e.undo()
    assert _same(m, before)
    for e in stream[:2]:
        e.apply(m)
    loaded = ie.load_edit(tmp_path / "a.safetensors").apply(m)
    assert _same(m, edited) and set(loaded.keys) == set(stream[2].keys)
    torch.testing.assert_close(loaded.keys[next(iter(loaded.keys))],
                               stream[2].keys[next(iter(loaded.keys))])
    for e in (loaded, stream[1], stream[0]):
        e.undo()
    assert _same(m, before)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
@pytest.mark.parametrize("case,match", [
    ("conflict", "conflicting targets"),
    ("twice", "twice"),
    ("empty", "no edit requests"),
    ("outside", "outside the 4-layer model"),
    ("gap", "contiguous"),
    ("none", "non-empty tuple"),
])
def test_bad_inputs_raise_before_any_weight_changes(fm, HP, method, case, match):
    m = fm.model
    reqs = _city_requests(fm)[:2]
    other = ie.EditRequest(reqs[0].prompt, reqs[0].subject, "Oslo" if reqs[0].target_new != "Oslo"
                           else "Lima")
    batch, layers = {"conflict": ([*reqs, other], (0,)),
                     "twice": ([*reqs, reqs[0]], (0,)), "empty": ([], (0,)),
                     "outside": (reqs, (3, 4)), "gap": (reqs, (0, 2)), "none": (reqs, ())}[case]
    before = _weights(m)
    with pytest.raises(InterpEditError, match=match):
        ie.edit(m, batch, method=method, layers=layers, **HP)
    assert _same(m, before)


def test_keys_star_batches_key_star(fm):
    m = fm.model
    reqs = _city_requests(fm)[:3]
    contexts = keys.context_templates(m, 2, 3)
    both = keys.keys_star(m, 1, [(r.template, r.subject) for r in reqs], contexts)
    for i, r in enumerate(reqs):
        torch.testing.assert_close(both[i], keys.key_star(m, 1, r.template, r.subject, contexts))


def test_auto_layers_come_from_locate_and_are_recorded(fm, HP):
    m = fm.model
    reqs = _city_requests(fm)[:3]
    loc = ie.locate(m, reqs[:2], kind="mlp", span=2, search=(0.0, 0.75), samples=2, seed=1)
    with ie.edit(m, reqs, method="memit", layers="auto", auto_span=2, auto_search=(0.0, 0.75),
                 auto_facts=2, trace_samples=2, **HP) as e:
        assert e.info["layers"] == list(loc.layers) and len(loc.layers) == 2
        assert e.info["why"].startswith(loc.reason) and "first 2 of the 3 facts" in e.info["why"]
        assert e.info["locate"]["layers"] == list(loc.layers)
    with pytest.raises(InterpEditError, match="wider than"):
        ie.edit(m, reqs, method="memit", layers="auto", auto_span=4, auto_search=(0.0, 0.5), **HP)


def test_sequential_alphaedit_keeps_earlier_edits_memit_loses_some(fm, HP):
    """Four batches of four facts that share one template ("{} lives in the city of"), applied
    one after another: every AlphaEdit edit that took still holds at the end; MEMIT loses
    some of its earlier edits (the same-template failure)."""
    m = fm.model
    reqs = _city_requests(fm)

    def holds(r):
        return bool(m.next_token_probs([r.text, r.text], [r.target_true, r.target_new]).diff() > 0)

    before = _weights(m)
    outcome = {}
    for method, extra in (("memit", dict(mom2_update_weight=1.0)),
                          ("alphaedit", dict(alpha=1e-3, null_threshold=0.3))):
        stream, took = [], []
        for b in range(0, 16, 4):
            stream.append(ie.edit(m, reqs[b:b + 4], method=method, layers=(0,),
                                  **{**HP, "v_lr": 0.5}, **extra))
            took += [i for i in range(b, b + 4) if holds(reqs[i])]
        outcome[method] = (len(took), sum(holds(reqs[i]) for i in took))
        for e in reversed(stream):
            e.undo()
        assert _same(m, before)
    took, kept = outcome["alphaedit"]
    assert took >= 10 and kept == took, outcome
    took, kept = outcome["memit"]
    assert kept < took, outcome


def _post_norm(family, zero_gain, d=24):
    """The tiny ``family`` model's MLP post-norm with random gains of either sign, one of
    them 0 if ``zero_gain`` (as Gemma-3-270M has), else all of magnitude ≥ 0.5."""
    m = wrap_tiny(family, n_layers=1, d_model=d, seed=0)
    norm = adapter(m).mlp_post_norm(0)
    g = torch.Generator().manual_seed(1)
    gain = torch.randn(d, generator=g)
    gain = torch.where(gain.abs() < 0.5, gain.sign() * 0.5, gain)
    if zero_gain:
        gain[0] = 0.0
    with torch.no_grad():  # Gemma scales by 1 + w, OLMo-2 by w
        norm.weight.copy_(gain - 1.0 if family == "gemma3" else gain)
    return norm


@pytest.mark.parametrize("family", ["gemma3", "olmo2"])
def test_written_change_takes_the_residual_back_through_the_post_norm(family):
    """A residual change N(m + δ) − N(m) that the post-norm N can reach is taken back to a
    write whose output equals it, with the least change among the scale-equivalent writes;
    with a gain of 0 it is matched to within 5% (that coordinate keeps its relative value,
    and with it its share of the rms); no norm is the identity; a LayerNorm is refused."""
    g = torch.Generator().manual_seed(2)
    m = torch.randn(5, 24, generator=g) * 3
    delta = torch.randn(5, 24, generator=g)
    for zero_gain, tol in ((False, 1e-4), (True, 5e-2)):
        norm = _post_norm(family, zero_gain)
        r = memit.resid_change(norm, m, delta)
        change = memit.written_change(norm, m, r)
        with torch.no_grad():
            miss = (norm(m + change) - norm(m) - r).norm(dim=1) / r.norm(dim=1)
            assert float(miss.max()) < tol, (zero_gain, miss)
            if not zero_gain:  # the same output from a scaled copy is farther from m
                for c in (0.5, 0.9, 1.1, 2.0):
                    far = (c * (m + change) - m).norm(dim=1)
                    assert bool((far >= change.norm(dim=1) - 1e-5).all())
                assert bool((change.norm(dim=1) <= delta.norm(dim=1) + 1e-5).all())
    assert memit.written_change(None, m, r) is r and memit.resid_change(None, m, delta) is delta
    with pytest.raises(InterpEditError, match="not an RMS norm"):
        memit.written_change(torch.nn.LayerNorm(24), m, r)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_post_norm_family_reaches_its_target(fact_corpus, method):
    """On the fact model of a post-norm family (Gemma 3), the spread through each layer's
    post-norm lands the residual stream on z: one fact at one layer with λ = 0 (to 0.5%), a
    batch over two layers most of the way (0.80 here); every edited fact moves towards its
    new object (p(new) up, p(true) down). The facts do not flip: on this tiny model a
    post-normed MLP output at the subject cannot outweigh the rest of the stream, and ROME
    at the same layer fails to flip them too. Undo is bit-exact."""
    fmg = fact_model(family="gemma3")
    m = fmg.model
    hp = dict(n_prefixes=0, v_steps=100, v_nll_stop=0.01, v_weight_decay=0.01, v_lr=1.0,
              corpus=str(fact_corpus), stats_tokens=2000, precision="fp32")
    reqs = _city_requests(fmg)
    before = _weights(m)

    def probs():
        return torch.stack([m.next_token_probs([r.text, r.text], [r.target_true, r.target_new])
                            for r in reqs[:4]])

    p0 = probs()
    if method == "memit":
        with ie.edit(m, reqs[0], method="memit", layers=(1,), mom2_update_weight=0.0,
                     **hp) as e:
            assert e.info["target_reached"] > 0.995, e.info["target_reached"]
    extra = dict(mom2_update_weight=0.0) if method == "memit" else dict(alpha=1e-3)
    with ie.edit(m, reqs[:4], method=method, layers=(0, 1), **hp, **extra) as e:
        assert e.info["target_reached"] > 0.7, e.info["target_reached"]
        p1 = probs()
        assert bool((p1[:, 1] > p0[:, 1]).all() and (p1[:, 0] < p0[:, 0]).all()), (p0, p1)
    assert _same(m, before)
