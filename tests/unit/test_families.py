"""Every method on a tiny random model of every family the adapter knows
(:mod:`interp_edit.arch.tiny`): exact tracing, the attribution screen, ROME, MEND's
factors, resuming from a block, FT / FT-L / IKE, undo and save/load."""

from __future__ import annotations

import pytest
import torch

import interp_edit as ie
from interp_edit import hooks
from interp_edit.arch import adapter, hf_name
from interp_edit.arch.stepper import Stepper
from interp_edit.arch.tiny import TINY_FAMILIES, tiny_model
from interp_edit.editing.base import load_edit
from interp_edit.editing.mend import MENDConfig
from interp_edit.editing.mend_factors import gradient_factors
from interp_edit.editing.rome import ROMEHparams, apply_rome
from interp_edit.models import mlp_key_hook, mlp_write_hook
from interp_edit.resume import block_input, logits_from, record_block_input
from interp_edit.testing import _subjects

ATOL = 1e-5
STEPPER = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "olmo2", "phi3",
           "gpt2", "gptj", "gpt_neox", "opt"}  # every family: the layer stepper runs them all
SUBJECT = _subjects(16, 0)[3]
PROMPT = f"the home of {SUBJECT} is the city of"  # subject inside, longer than every window
# the subject within every sliding window of the last token, so that an edit can reach it
SHORT = f"the job of {SUBJECT} is a"


@pytest.fixture(scope="session")
def family_models() -> dict:
    """One tiny model per family, built on first use and shared by the session."""
    return {}


@pytest.fixture(params=TINY_FAMILIES)
def model(request, family_models):
    family = request.param
    if family not in family_models:
        family_models[family] = tiny_model(family)
    return family_models[family]


@pytest.fixture(params=sorted(STEPPER))
def stepped(request, family_models):
    """The models of the families the layer stepper runs."""
    family = request.param
    if family not in family_models:
        family_models[family] = tiny_model(family)
    return family_models[family]


def _family(model) -> str:
    return adapter(model).family.name


def test_family_known_and_fast_path_where_promised(model):
    """The stepper supports the family, and nothing keeps the fast paths from using it on a
    freshly loaded model (OPT's bridge installs permanent wiring hooks, which do not count)."""
    assert Stepper.supports(model) == (_family(model) in STEPPER)
    assert Stepper.usable(model) == (_family(model) in STEPPER)


def test_stepper_forward_equals_the_model(stepped):
    model = stepped
    ids = model.tokenize(PROMPT)[None]
    st = Stepper(model, ids.shape[1])
    run = st.full_run(ids)
    assert (st.unembed(run.x[-1]) - model.logits(ids)).abs().max() <= ATOL


@pytest.mark.parametrize("kind,sever", [("resid", None), ("mlp", None), ("attn", None),
                                        ("resid", "mlp")])
def test_fast_equals_reference(model, kind, sever):
    kw = dict(target="Paris", kind=kind, window=2, samples=3, sever=sever, progress=False)
    fast = ie.trace(model, PROMPT, SUBJECT, method="fast", **kw)
    ref = ie.trace(model, PROMPT, SUBJECT, method="reference", **kw)
    assert fast.low_score == pytest.approx(ref.low_score, abs=ATOL)
    assert (fast.scores - ref.scores).abs().max() <= ATOL


def test_attribution_is_first_order_exact(model):
    """The screen's resid cells approach the exact ones as the noise shrinks (first order:
    the error falls faster than the noise)."""
    errors = []
    for std in ("s0.1", "s0.01"):  # x the subject-embedding std
        kw = dict(target="Paris", kind="resid", samples=2, noise=std, progress=False)
        exact = ie.trace(model, PROMPT, SUBJECT, method="fast", **kw)
        screen = ie.trace(model, PROMPT, SUBJECT, method="attribution", precision="model",
                          estimate="prob", **kw)
        ok = ~torch.isnan(screen.scores)
        errors.append(float((screen.scores - exact.scores)[ok].abs().max()))
    assert errors[1] < errors[0] / 3 or errors[1] < 1e-7


def test_rome_writes_v_star_where_the_matrix_writes(model):
    """W'k* = v* with the module's own weights (either orientation); the edit is exactly a
    change of what the matrix writes at ``mlp_write_hook`` (before any post-norm, the space v*
    was optimised in); and it raises p(new)."""
    # no weight decay: it is relative to ‖W k*‖², which random weights make ~0
    hp = ROMEHparams(layer=1, n_prefixes=0, stats_tokens=500, precision="fp32",
                     v_weight_decay=0.0)
    req = ie.EditRequest(SHORT, SUBJECT, "pilot", "chef")
    ids = model.tokenize(SHORT)[None]
    store: dict = {}
    with hooks.hooked(model, [hooks.capture(mlp_key_hook(1), store)]):
        before = model.logits(ids)[0, -1]
    keys = store[mlp_key_hook(1)][0]  # [pos, d_mlp]
    k = keys[model.subject_range(SHORT, SUBJECT)[1] - 1]
    with apply_rome(model, [req], hp) as edit:
        (name, update), = edit.deltas.items()
        assert name == hf_name(name) and "_original_component" not in name
        proj = model.mlp_out_proj(1)
        v = edit.info["edits"][0]["v"]
        out = proj(k[None])[0] - (0 if proj.bias is None else proj.bias)
        assert (out - adapter(model).mlp_out_matrix(1) @ k).abs().max() <= 1e-4
        after = model.logits(ids)[0, -1]
    change = keys @ adapter(model).from_parameter(1, update).T  # ΔW k at every position
    with hooks.hooked(model, [hooks.add_delta(mlp_write_hook(1), slice(None), change[None])]):
        assert (model.logits(ids)[0, -1] - after).abs().max() <= 1e-4
    new = model.target_ids("pilot")[0]
    assert after.softmax(-1)[new] > before.softmax(-1)[new]
    assert v["nll"][1] < v["nll"][0]


def test_mend_factors_are_the_weight_gradient(model):
    layers = [1, 2]
    prompts, targets = [PROMPT, f"{SUBJECT} works as a"], ["Tokyo", "pilot"]
    factors = gradient_factors(model, layers, prompts, targets)
    d_mlp = factors[1][0].shape[1]  # the keys' width: what the matrix maps from
    assert MENDConfig.for_model(model, layers, "given").shapes == ((model.d_model, d_mlp),) * 2
    weights = [model.mlp_out_proj(j).weight for j in layers]
    try:
        for w in weights:
            w.requires_grad_(True)
        n = torch.tensor([len(model.target_ids(t)) for t in targets], dtype=torch.float32)
        loss = -(model.target_logprobs(prompts, targets, grad=True) / n).sum()
        grads = torch.autograd.grad(loss, weights)
    finally:
        for w in weights:
            w.requires_grad_(False)
    for j, g in zip(layers, grads):
        u, delta = factors[j]
        want = adapter(model).from_parameter(j, g)  # [d_model, d_mlp]
        got = torch.einsum("nd,ni->di", delta, u)
        assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))


def test_top_blocks_rerun_give_the_full_logits(model):
    ids = model.tokenize(PROMPT)[None]
    full = model.logits(ids)
    with record_block_input(model, 1) as rec:
        model.logits(ids)
    assert (logits_from(model, rec.value) - full).abs().max() <= ATOL
    assert (logits_from(model, block_input(model, ids, 1)) - full).abs().max() <= ATOL


@pytest.mark.parametrize("method", ["ft", "ft-l"])
def test_finetune_runs_and_undoes_bit_exact(model, method, tmp_path):
    before = {n: p.detach().clone() for n, p in model.hf_model.named_parameters()}
    req = ie.EditRequest(PROMPT, SUBJECT, "Tokyo")
    edit = ie.edit(model, [req], method=method, layer=0.5, steps=3)
    assert edit.deltas and all("_original_component" not in n for n in edit.deltas)
    path = edit.save(tmp_path / "e.safetensors")
    after = {n: p.detach().clone() for n, p in model.hf_model.named_parameters()}
    edit.undo()
    assert all(torch.equal(p, before[n]) for n, p in model.hf_model.named_parameters())
    with load_edit(path).apply(model):
        assert all(torch.equal(p, after[n]) for n, p in model.hf_model.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.hf_model.named_parameters())


def test_ike_runs(model):
    req = ie.EditRequest(PROMPT, SUBJECT, "Tokyo")
    with ie.edit(model, [req], method="ike", demos=0) as edit:
        assert edit.context and float(model.next_token_probs(edit.wrap(PROMPT), "Tokyo")) >= 0


def test_edits_saved_with_wrapped_names_still_load(model, tmp_path):
    """Files written before edits used Hugging Face names (the bridge's wrapped paths)."""
    from interp_edit.editing.base import AppliedEdit

    wrapped = next(n for n, p in model.hf_model.named_parameters()
                   if p is model.mlp_out_proj(1).weight)
    assert "_original_component" in wrapped
    delta = torch.full_like(model.mlp_out_proj(1).weight, 1e-3)
    req = ie.EditRequest("{} is a", "Paris", "city")  # a saved edit holds its requests
    old = AppliedEdit.from_deltas(model, "toy", [req], {}, {wrapped: delta})
    path = old.save(tmp_path / "old.safetensors")
    want = model.mlp_out_proj(1).weight.detach().clone()
    old.undo()
    with load_edit(path).apply(model):
        assert torch.equal(model.mlp_out_proj(1).weight, want)
