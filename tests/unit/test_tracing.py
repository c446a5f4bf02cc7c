"""Causal tracing on the tiny fact model: the fast engine equals the reference cell by cell,
severed paths equal a direct PyTorch-hook implementation, and the scores behave."""

import pytest
import torch

import interp_edit as ie
from interp_edit.tracing import engine
from interp_edit.arch import unwrap as _orig

KINDS = ("resid", "mlp", "attn")
ATOL = 1e-5


@pytest.fixture(scope="module")
def fact(fm):
    return fm.facts[0]


@pytest.fixture(scope="module")
def ref_set(fm, fact):
    return ie.trace_all(fm.model, fact.prompt, fact.subject, window=3, samples=4,
                        method="reference")


def test_fast_equals_reference_every_kind(fm, fact, ref_set):
    fast = ie.trace_all(fm.model, fact.prompt, fact.subject, window=3, samples=4)
    for kind in KINDS:
        assert fast[kind].kind == kind and fast[kind].method == "fast"
        assert (fast[kind].scores - ref_set[kind].scores).abs().max() <= ATOL, kind
        assert abs(fast[kind].low_score - ref_set[kind].low_score) <= ATOL
        assert fast[kind].high_score == ref_set[kind].high_score


@pytest.mark.parametrize("template, window", [
    ("the home of {} is the city of", 3),  # tokens before the subject: no-op cells
    ("the home of {}", 3),  # the subject ends the prompt: its last token is the last token
    ("the home of {} is the city of", 1),  # one-layer windows
    ("{} lives in the city of", 9),  # windows wider than the model
])  # fmt: skip
def test_fast_equals_reference_wherever_the_subject_is(fm, fact, template, window):
    prompt = template.format(fact.subject)
    kw = dict(window=window, samples=3)
    fast = ie.trace_all(fm.model, prompt, fact.subject, **kw)
    ref = ie.trace_all(fm.model, prompt, fact.subject, method="reference", **kw)
    n = fast.resid.n_tokens
    assert (fast.resid.subject_range[1] == n) == template.endswith("{}")
    for kind in KINDS:
        assert (fast[kind].scores - ref[kind].scores).abs().max() <= ATOL, kind
    # the shortcuts: before the subject, and the last layer's output away from the last token,
    # change nothing; the last layer's output at the last token is the clean state
    start = fast.resid.subject_range[0]
    assert (fast.resid.scores[:start] == fast.resid.low_score).all()
    assert (fast.resid.scores[:-1, -1] == fast.resid.low_score).all()
    assert fast.resid.scores[-1, -1].item() == pytest.approx(fast.resid.high_score, abs=ATOL)


@pytest.mark.parametrize("sever", ["mlp", "attn"])
def test_severed_fast_equals_reference_subject_inside(fm, fact, sever):
    prompt = f"the home of {fact.subject} is the city of"
    kw = dict(samples=2, sever=sever)
    fast = ie.trace(fm.model, prompt, fact.subject, **kw)
    ref = ie.trace(fm.model, prompt, fact.subject, method="reference", **kw)
    assert fast.subject_range[0] > 0
    assert (fast.scores - ref.scores).abs().max() <= ATOL


def test_the_scores_move(ref_set):
    r = ref_set.resid
    assert r.high_score > 0.9 and r.low_score < r.high_score - 0.2, "the corruption must bite"
    assert r.indirect_effect.max() > 0.2


@pytest.mark.parametrize("sever", ["mlp", "attn"])
def test_severed_fast_equals_reference(fm, fact, sever):
    kw = dict(samples=3, sever=sever)
    fast = ie.trace(fm.model, fact.prompt, fact.subject, **kw)
    ref = ie.trace(fm.model, fact.prompt, fact.subject, method="reference", **kw)
    assert fast.sever == sever
    assert (fast.scores - ref.scores).abs().max() <= ATOL


def _direct_severed(model, ids, subject, noise, t, layer, sever, target_id):
    """ROME's trace_with_repatch, written with plain PyTorch forward hooks on the HF modules:
    pass 1 records the corrupted sublayer outputs, pass 2 restores block ``layer`` at ``t``
    and freezes the sublayer outputs of later layers at ``t``."""
    inner = _orig(model.hf_model.model)
    blocks = [_orig(b) for b in inner.layers]
    subs = [getattr(b, "mlp" if sever == "mlp" else "self_attn") for b in blocks]
    n = noise.shape[0]
    batch = ids[None].expand(n, -1)

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    def swap(out, value):
        new = first(out).clone()
        new[:, t] = value
        return (new, *out[1:]) if isinstance(out, tuple) else new

    def add_noise(mod, args, out):
        out = out.clone()
        out[:, subject[0] : subject[1]] += noise
        return out

    with torch.no_grad():
        clean = model.hf_model(ids[None], output_hidden_states=True).hidden_states[layer + 1]
        frozen, handles = {}, [inner.embed_tokens.register_forward_hook(add_noise)]
        for j, sub in enumerate(subs):
            handles.append(sub.register_forward_hook(
                lambda m, a, o, j=j: frozen.__setitem__(j, first(o)[:, t].clone())))
        model.hf_model(batch)
        for h in handles:
            h.remove()
        handles = [inner.embed_tokens.register_forward_hook(add_noise),
                   blocks[layer].register_forward_hook(lambda m, a, o: swap(o, clean[0, t]))]
        for j in range(layer + 1, len(blocks)):
            handles.append(subs[j].register_forward_hook(lambda m, a, o, j=j: swap(o, frozen[j])))
        try:
            logits = model.hf_model(batch).logits
        finally:
            for h in handles:
                h.remove()
    return float(logits[:, -1].softmax(-1)[:, target_id].mean())


@pytest.mark.parametrize("sever", ["mlp", "attn"])
def test_severed_matches_direct_implementation(fm, fact, sever):
    m = fm.model
    noise = torch.randn(3, 2, m.d_model, generator=torch.Generator().manual_seed(0)) * 0.5
    r = ie.trace(m, fact.prompt, fact.subject, samples=3, noise=noise, sever=sever)
    ids = m.tokenize(fact.prompt)
    assert r.subject_range == (0, 2)
    for t, layer in [(0, 0), (1, 1), (1, 2), (2, 0), (r.n_tokens - 1, 1)]:
        want = _direct_severed(m, ids, r.subject_range, noise, t, layer, sever, r.target_id)
        assert abs(r.scores[t, layer].item() - want) <= ATOL, (t, layer)


def test_generic_fallback_equals_reference(fm, fact, ref_set, monkeypatch):
    monkeypatch.setattr(engine.Stepper, "supports", staticmethod(lambda model: False))
    fast = ie.trace_all(fm.model, fact.prompt, fact.subject, window=3, samples=4)
    for kind in KINDS:
        assert (fast[kind].scores - ref_set[kind].scores).abs().max() <= ATOL


def test_seeded_runs_are_byte_identical(fm, fact):
    a, b = (ie.trace(fm.model, fact.prompt, fact.subject, samples=3, seed=7) for _ in range(2))
    assert a.scores.numpy().tobytes() == b.scores.numpy().tobytes()
    assert a.low_score == b.low_score
    c = ie.trace(fm.model, fact.prompt, fact.subject, samples=3, seed=8)
    assert not torch.equal(a.scores, c.scores)


def test_high_score_is_the_plain_forward_probability(fm, fact, ref_set):
    r = ref_set.resid
    assert r.target.strip() == fact.attribute  # target=None: the model's own top-1
    plain = float(fm.model.next_token_probs(fact.prompt, r.target))
    assert r.high_score == pytest.approx(plain, abs=1e-7)
    # the attribution screen's clean pass is a row of its corrupted batch: the same answer,
    # and in bf16 the same top-1 with a probability that moved by rounding only
    kw = dict(samples=3, method="attribution")
    a = ie.trace(fm.model, fact.prompt, fact.subject, precision="model", **kw)
    assert a.target == r.target and a.target_id == r.target_id
    assert a.high_score == pytest.approx(plain, abs=1e-6)
    b = ie.trace(fm.model, fact.prompt, fact.subject, precision="bfloat16", **kw)
    assert b.target == r.target and b.high_score == pytest.approx(plain, rel=0.02)
    assert b.high_score != a.high_score  # bf16 multiplies did run


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_restoring_the_whole_state_recovers_the_clean_probability(fm, fact, method):
    m = fm.model
    r = ie.trace(m, fact.prompt, fact.subject, samples=3, method=method)
    # the last token's final hidden state is all that the score reads
    assert r.scores[-1, -1].item() == pytest.approx(r.high_score, abs=ATOL)
    # with no corruption, every restoration gives the clean probability
    clean = ie.trace(m, fact.prompt, fact.subject, samples=2, noise=0.0, method=method, kind="all")
    for kind in KINDS:
        assert (clean[kind].scores - r.high_score).abs().max() <= ATOL
        assert clean[kind].low_score == pytest.approx(r.high_score, abs=ATOL)


def test_tokens_before_the_subject_score_low(fm):
    m = fm.model
    fact = fm.facts[0]
    prompt = next(p for p in fact.paraphrases if not p.startswith("{}")).format(fact.subject)
    r = ie.trace(m, prompt, fact.subject, samples=3, kind="all")
    start = r.resid.subject_range[0]
    assert start > 0
    for kind in KINDS:
        assert (r[kind].scores[:start] == r[kind].low_score).all()
    ref = ie.trace(m, prompt, fact.subject, samples=3, method="reference", positions=[0, start])
    assert (ref.scores[[0, start]] - r.resid.scores[[0, start]]).abs().max() <= ATOL


def test_positions_and_layers_select_cells(fm, fact, ref_set):
    r = ie.trace(fm.model, fact.prompt, fact.subject, window=3, samples=4, kind="mlp",
                 positions=[1, -1], layers=[2])
    chosen = torch.zeros_like(r.scores, dtype=torch.bool)
    chosen[[1, r.n_tokens - 1], 2] = True
    assert r.scores[~chosen].isnan().all()
    assert (r.scores[chosen] - ref_set.mlp.scores[chosen]).abs().max() <= ATOL


def test_given_noise_tensor_is_used_as_given(fm, fact):
    noise = torch.randn(2, 2, fm.model.d_model)
    a = ie.trace(fm.model, fact.prompt, fact.subject, samples=2, noise=noise, seed=1)
    b = ie.trace(fm.model, fact.prompt, fact.subject, samples=2, noise=noise, seed=2)
    assert torch.equal(a.scores, b.scores) and a.noise_source == "given tensor"
    s = ie.trace(fm.model, fact.prompt, fact.subject, samples=2, noise="s3")
    assert "built-in reference subjects" in s.noise_source and s.noise_std > 0
    f = ie.trace(fm.model, fact.prompt, fact.subject, samples=2, noise=0.25)
    assert f.noise_std == 0.25 and f.noise_source == "fixed std"


def test_attribution_correlates_with_exact(fm, fact, ref_set):
    approx = ie.trace_all(fm.model, fact.prompt, fact.subject, window=3, samples=4,
                          method="attribution", precision="model")
    for kind in KINDS:
        a, e = approx[kind].scores.flatten(), ref_set[kind].scores.flatten()
        assert approx[kind].low_score == pytest.approx(ref_set[kind].low_score, abs=ATOL)
        r = torch.corrcoef(torch.stack([a, e]))[0, 1]
        assert r > 0.3, (kind, float(r))
    with pytest.raises(ie.InterpEditError, match="sever"):
        ie.trace(fm.model, fact.prompt, fact.subject, method="attribution", sever="mlp")


def logodds_step(p: float, d: torch.Tensor) -> torch.Tensor:
    """p's log-odds moved by the log-p change d times d(log-odds)/d(log p) = 1 / (1 - p)."""
    return torch.sigmoid(torch.logit(torch.tensor(p, dtype=torch.float64)) + d.double() / (1 - p)
                         ).float()


def test_attribution_is_the_exact_trace_to_first_order(tiny):
    """With one noise sample of small std, restoring one site is a small step: both estimates
    approach the exact grid as the noise shrinks, the error falling about linearly with the
    std as a first-order estimate's should (a random model, whose answer is not saturated;
    one-layer windows, see the next test). With one sample the two estimates are one number
    per cell apart: ``"logodds"`` is ``sigmoid(logit(p) + d / (1 - p))`` where ``"prob"`` is
    ``p (1 + d)``. Other estimates are refused."""
    prompt, subject = "a b c d e", "b c"
    kw = dict(window=1, samples=1, kind="all", target="d")
    errors = []
    for std in (3e-3, 1e-3):
        exact = ie.trace(tiny, prompt, subject, noise=std, **kw)
        screens = {est: ie.trace(tiny, prompt, subject, noise=std, method="attribution",
                                 precision="model", estimate=est, **kw)
                   for est in ("logodds", "prob")}
        worst = 0.0
        for kind in KINDS:
            e = exact[kind].indirect_effect
            for est, screen in screens.items():
                assert screen[kind].estimate == est and exact[kind].estimate is None
                assert screen[kind].low_score == pytest.approx(exact[kind].low_score, abs=1e-7)
                err = (screen[kind].indirect_effect - e).abs().max() / e.abs().max()
                worst = max(worst, float(err))
            p = screens["prob"][kind].low_score
            d = screens["prob"][kind].scores / p - 1
            torch.testing.assert_close(screens["logodds"][kind].scores,
                                       logodds_step(p, d), rtol=1e-5, atol=1e-9)
        errors.append(worst)
    assert errors[1] < 0.2 and errors[1] < 0.5 * errors[0], errors
    with pytest.raises(ie.InterpEditError, match="unknown estimate 'linear'"):
        ie.trace(tiny, prompt, subject, method="attribution", estimate="linear")
    with pytest.raises(ie.InterpEditError, match="method='attribution' only"):
        ie.trace(tiny, prompt, subject, estimate="prob")


def test_attribution_window_sums_its_layers(fm, fact):
    """A window's estimate is the sum of its layers' one-layer estimates: in ``"prob"`` the
    effects add, in ``"logodds"`` each sample's log-p changes do. The sum ignores that
    restoring several outputs of a token together also cuts the paths between them, so
    windows are not exact to first order."""
    kw = dict(samples=1, method="attribution", precision="model")
    L = fm.model.n_layers
    for kind in ("mlp", "attn"):
        one = ie.trace(fm.model, fact.prompt, fact.subject, kind=kind, window=1,
                       estimate="prob", **kw)
        low = one.low_score
        d = one.indirect_effect / low  # each layer's first-order change of log p
        for est in ("prob", "logodds"):
            three = ie.trace(fm.model, fact.prompt, fact.subject, kind=kind, window=3,
                             estimate=est, **kw)
            for layer in range(L):
                dw = d[:, max(0, layer - 1) : min(L, layer + 2)].sum(1)
                want = low * (1 + dw) if est == "prob" else logodds_step(low, dw)
                torch.testing.assert_close(three.scores[:, layer], want, rtol=1e-4, atol=1e-6)


def test_attribution_in_bf16_stays_close_to_fp32(fm, fact):
    """precision="bfloat16": the screen multiplies (forward and backward) with bf16 copies of
    the weights; its grid moves by rounding only, and the result says what ran. The default
    ("auto") is bf16 where the CPU multiplies it natively. The exact methods refuse bf16 and
    ignore "auto"; an unknown precision is named."""
    from interp_edit._precision import low_precision_supported

    kw = dict(window=3, samples=4, method="attribution")
    fp32 = ie.trace_all(fm.model, fact.prompt, fact.subject, precision="model", **kw)
    bf16 = ie.trace_all(fm.model, fact.prompt, fact.subject, precision="bfloat16", **kw)
    assert fp32.resid.precision == "model" and bf16.resid.precision == "bfloat16"
    auto = ie.trace(fm.model, fact.prompt, fact.subject, **kw)
    native = low_precision_supported(fm.model.device)
    assert auto.precision == ("bfloat16" if native else "model")
    torch.testing.assert_close(auto.scores, (bf16 if native else fp32).resid.scores, rtol=0,
                               atol=0, equal_nan=True)
    assert ie.trace(fm.model, fact.prompt, fact.subject, samples=2).precision == "model"
    for kind in KINDS:
        a, b = fp32[kind].scores.flatten(), bf16[kind].scores.flatten()
        keep = ~a.isnan()
        assert torch.equal(keep, ~b.isnan()) and not torch.equal(a[keep], b[keep])
        assert torch.corrcoef(torch.stack([a[keep], b[keep]]))[0, 1] > 0.98, kind
        # p = softmax of bf16 logits: a few percent apart (5.7% seen on one CPU's bf16 kernels)
        assert bf16[kind].low_score == pytest.approx(fp32[kind].low_score, rel=0.1)
    with pytest.raises(ie.InterpEditError, match="method='attribution' only"):
        ie.trace(fm.model, fact.prompt, fact.subject, precision="bfloat16")
    with pytest.raises(ie.InterpEditError, match="precision 'fp8'"):
        ie.trace(fm.model, fact.prompt, fact.subject, method="attribution", precision="fp8")


def test_low_precision_linear_has_the_bf16_input_gradient():
    """The packed bf16 multiply (oneDNN, which has no derivative) gets its input gradient from
    a packed copy of the transposed weights: the same as autograd through a plain bf16
    F.linear."""
    import torch.nn.functional as F

    from interp_edit._precision import low_precision_linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 80)
    x = torch.randn(2, 5, 48).to(torch.bfloat16).requires_grad_()
    out = low_precision_linear(lin, x, torch.bfloat16)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, g)
    x2 = x.detach().requires_grad_()
    plain = F.linear(x2, lin.weight.to(torch.bfloat16), lin.bias.to(torch.bfloat16))
    (grad_plain,) = torch.autograd.grad(plain, x2, g)
    torch.testing.assert_close(out, plain, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad.float(), grad_plain.float(), rtol=1e-2, atol=1e-2)
    with torch.no_grad():
        assert not low_precision_linear(lin, x, torch.bfloat16).requires_grad


def test_rotary_gradient_is_the_transposed_rotation():
    """The rotary embedding's closed-form backward (used wherever a gradient flows: the
    attribution screen, MEND) equals autograd through the plain in-place formula, and its
    forward is the plain one bit for bit."""
    from interp_edit.arch.rotary import Rotary as _Rotary, rotate as _rotate

    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(2, 5, 1, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: _Rotary.apply(v, cos, sin), (x,))
    g = torch.randn(3, 5, 4, 8, dtype=torch.float64)
    (closed,) = torch.autograd.grad(_Rotary.apply(x, cos, sin), x, g)
    (plain,) = torch.autograd.grad(_rotate(x, cos, sin), x, g)
    torch.testing.assert_close(closed, plain, rtol=0, atol=1e-12)
    assert torch.equal(_Rotary.apply(x, cos, sin), _rotate(x, cos, sin))


def test_attribution_last_layer_before_the_last_token_is_low(fm, fact):
    """Restoring a last-layer state before the last token reaches nothing: low_score exactly,
    in the screen (whose last layer computes the last position alone) as in the fast engine;
    the full-position hooked path agrees with the screen elsewhere
    (test_attribution_through_stepper_and_hooks_agree)."""
    kw = dict(window=3, samples=3)
    approx = ie.trace(fm.model, fact.prompt, fact.subject, method="attribution", **kw)
    exact = ie.trace(fm.model, fact.prompt, fact.subject, **kw)
    for r in (approx, exact):
        assert (r.scores[:-1, -1] == r.low_score).all()
        assert r.scores[-1, -1] != r.low_score


def test_save_load_round_trip(tmp_path, ref_set):
    r = ref_set.attn
    r.save(tmp_path / "one.npz")
    back = ie.TraceResult.load(tmp_path / "one.npz")
    assert torch.equal(back.scores, r.scores)
    for name in ("low_score", "high_score", "tokens", "token_ids", "subject_range", "target",
                 "target_id", "kind", "window", "noise_std", "noise_source", "samples", "seed",
                 "model_name", "method", "sever", "precision", "prompt", "subject"):
        assert getattr(back, name) == getattr(r, name), name
    ref_set.save(tmp_path / "set")  # .npz added, as numpy does
    both = ie.tracing.TraceSet.load(tmp_path / "set.npz")
    assert all(torch.equal(both[k].scores, ref_set[k].scores) for k in KINDS)
    assert both.mlp.kind == "mlp"


@pytest.mark.parametrize("inside", [False, True])
def test_attribution_through_stepper_and_hooks_agree(fm, fact, monkeypatch, inside):
    """The layer stepper's screen (the clean prompt a row of the batch, the last layer at the
    last position) equals the hook-based one, with the subject at the start or inside."""
    prompt = fact.prompt
    if inside:
        prompt = next(p for p in fact.paraphrases if not p.startswith("{}")).format(fact.subject)
    kw = dict(window=3, samples=3, method="attribution", precision="model")
    stepper = ie.trace_all(fm.model, prompt, fact.subject, **kw)
    assert (stepper.resid.subject_range[0] > 0) == inside
    monkeypatch.setattr(engine.Stepper, "supports", staticmethod(lambda model: False))
    hooked = ie.trace_all(fm.model, prompt, fact.subject, **kw)
    for kind in KINDS:
        assert (stepper[kind].scores - hooked[kind].scores).abs().max() <= ATOL
        assert stepper[kind].high_score == pytest.approx(hooked[kind].high_score, abs=1e-6)
        assert stepper[kind].low_score == pytest.approx(hooked[kind].low_score, abs=1e-6)
        assert stepper[kind].target_id == hooked[kind].target_id


@pytest.mark.parametrize("method", ["fast", "reference", "attribution"])
def test_every_method_runs_the_clean_prompt_once(fm, fact, monkeypatch, method):
    """Through the hook layer (the reference, and models the layer stepper does not run)
    each method scores the clean pass that captures the clean activations instead of
    running another one for the target and high_score; on the layer stepper the fast engine
    reuses ``prepare``'s and the screen runs the clean prompt as a row of its batch."""
    from interp_edit.models import Model

    calls = []
    logits, full_run = Model.logits, engine.Stepper.full_run
    monkeypatch.setattr(Model, "logits", lambda self, ids, *a, **k: (
        calls.append(int(ids.shape[0])), logits(self, ids, *a, **k))[1])
    monkeypatch.setattr(engine.Stepper, "full_run", lambda self, ids, *a, **k: (
        calls.append(int(ids.shape[0])), full_run(self, ids, *a, **k))[1])
    kw = dict(window=3, samples=2, method=method)
    if method == "attribution":
        kw["precision"] = "model"
    stepper = ie.trace_all(fm.model, fact.prompt, fact.subject, **kw)
    assert calls.count(1) == (0 if method == "attribution" else 1)  # the screen: a batch row
    calls.clear()
    monkeypatch.setattr(engine.Stepper, "supports", staticmethod(lambda model: False))
    hooked = ie.trace_all(fm.model, fact.prompt, fact.subject, **kw)
    assert calls.count(1) == 1 and hooked.resid.high_score == stepper.resid.high_score
