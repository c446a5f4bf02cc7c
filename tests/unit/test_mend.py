"""MEND on the tiny synthetic-fact model: exact gradient factors, the identity-initialised
network, a short meta-training run that makes edits work, bit-exact undo, checkpoints."""

from __future__ import annotations

import random

import pytest
import torch

import interp_edit as ie
from interp_edit.arch import hf_name
from interp_edit.editing.base import parameter_name
from interp_edit.editing.mend import MENDConfig, MENDEditor, last_layers
from interp_edit.editing.mend_factors import TargetBatch, gradient_factors
from interp_edit.editing.mend_network import GradientTransform, RunningNorm
from interp_edit.editing.mend_train import (
    TrainConfig, choose_layers, substituted, train_editor)
from interp_edit.errors import CorruptFileError, InterpEditError, ModelMismatchError
from interp_edit.evaluation import EditRecord, evaluate
from interp_edit.resume import logits_from, record_block_input
from interp_edit.testing import RELATIONS

SHORT = TrainConfig(steps=120, val_every=40, val_n=12, patience=0, lr=1e-3, lr_lr=0.05,
                    init_step=0.002)


def fact_records(fm, facts, per_fact: int, seed: int) -> list[EditRecord]:
    """Counterfactual edits of the fact model's facts: a new attribute of the same relation,
    the other templates as paraphrases, another subject's fact as the neighbour."""
    rng = random.Random(seed)
    out = []
    for f in facts:
        others = [g for g in fm.facts if g.relation == f.relation and g.subject != f.subject]
        for new in rng.sample([a for a in RELATIONS[f.relation][1] if a != f.attribute], per_fact):
            g = rng.choice(others)
            out.append(EditRecord(f"{f.subject}/{f.relation}/{new}", f.template, f.subject, new,
                                  f.attribute, paraphrases=tuple(p.format(f.subject)
                                                                 for p in f.paraphrases),
                                  neighborhood=((g.prompt, g.attribute),)))
    return out


@pytest.fixture(scope="module")
def data(fm):
    facts = list(fm.facts)
    return fact_records(fm, facts[:24], 4, seed=0), fact_records(fm, facts[24:], 2, seed=1)


@pytest.fixture(scope="module")
def trained(fm, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mend") / "mend.safetensors"
    result = train_editor(fm.model, data[0], data[1], SHORT, out=out, progress=False)
    return out, result


def _weights(model):
    return {hf_name(k): v.detach().clone() for k, v in model.hf_model.named_parameters()}


def test_gradient_factorisation_is_exact(fm):
    m, facts = fm.model, fm.facts
    prompts, targets = [facts[0].prompt, facts[3].prompt], ["Rome Paris", "pilot"]
    layers = (1, 3)
    factors = gradient_factors(m, layers, prompts, targets)
    weights = [m.mlp_out_proj(layer).weight for layer in layers]
    for w in weights:
        w.requires_grad_(True)
    try:
        n = torch.tensor([len(m.target_ids(t)) for t in targets])
        loss = -(m.target_logprobs(prompts, targets, grad=True) / n).sum()
        grads = torch.autograd.grad(loss, weights)
    finally:
        for w in weights:
            w.requires_grad_(False)
    for layer, grad in zip(layers, grads):
        u, delta = factors[layer]
        assert torch.allclose(torch.einsum("no,ni->oi", delta, u), grad, atol=1e-6, rtol=1e-5)
    # only tokens that get a gradient are kept: at the last layer, the target positions only
    assert len(factors[3][0]) == 2 + 1


def test_untrained_network_is_the_identity():
    net = GradientTransform(d_in=6, d_out=4, rank=3, n_blocks=2, n_modes=2).eval()
    u, delta = torch.randn(5, 6), torch.randn(5, 4)
    u_hat, delta_hat = net(u, delta, mode=1)
    assert torch.equal(u_hat, u) and torch.equal(delta_hat, delta)


def test_running_norm_matches_batch_statistics():
    norm, xs = RunningNorm(3).train(), [torch.randn(n, 3) * 4 + 2 for n in (1, 5, 9)]
    for x in xs:
        norm(x)
    allx = torch.cat(xs)
    assert torch.allclose(norm.mean.float(), allx.mean(0), atol=1e-5)
    assert torch.allclose(norm.std.float(), allx.std(0), atol=1e-5)
    out = norm.eval()(allx)
    assert torch.allclose(out.mean(0), torch.zeros(3), atol=1e-5)


def test_edited_pass_matches_an_in_place_edit_and_restores_weights(fm):
    m = fm.model
    batch = TargetBatch.build(m, [fm.facts[0].prompt, fm.facts[5].paraphrases[0]],
                              ["Rome Paris", "chef"])
    with record_block_input(m, 2) as rec:
        m.logits(batch.ids)
    w = m.mlp_out_proj(2).weight
    delta = 0.1 * torch.randn_like(w)
    with substituted(m, {2: w + delta}):
        full = m.logits(batch.ids)
        tail = logits_from(m, rec.value)  # layers 2.. only
    assert m.mlp_out_proj(2).weight is w
    with torch.no_grad():
        w.add_(delta)
        in_place = m.logits(batch.ids)
        w.sub_(delta)
    assert torch.allclose(full, in_place, atol=1e-5) and torch.allclose(tail, in_place, atol=1e-5)


def test_resumed_step_equals_a_full_pass(fm, trained):
    """A step resumed from the first edited block (what passes > 1 do) gives the same factors
    and decision as a full pass at the same weights."""
    m, f = fm.model, fm.facts[3]
    editor = MENDEditor.load(trained[0], m)
    req = ie.EditRequest(f.template, f.subject, "Oslo", f.attribute)
    first = editor.step(m, [req])
    assert first.start is not None and first.start.layer == min(editor.config.layers)
    params = m.parameters_by_name
    saved = {name: params[name].detach().clone() for name in first.deltas}
    try:
        with torch.no_grad():
            for name, d in first.deltas.items():
                params[name].add_(d)
        full, resumed = editor.step(m, [req]), editor.step(m, [req], first.start)
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                params[name].copy_(w)
    assert full.done == resumed.done
    for name in full.deltas:
        assert torch.allclose(full.deltas[name], resumed.deltas[name], rtol=1e-4, atol=1e-8)
    assert not torch.equal(full.deltas[name], first.deltas[name])  # the weights did change


def test_training_raises_edit_success(fm, data, trained):
    out, result = trained
    untrained = result.history[0]
    assert untrained["step"] == 0
    best = max(result.history, key=lambda r: r["score"])
    assert best["efficacy"] >= untrained["efficacy"] + 0.5
    # held-out facts, through the public API and the evaluation harness
    report = evaluate(fm.model, data[1], method="mend", editor=str(out), progress=False)
    assert report.summary("efficacy").mean >= untrained["efficacy"] + 0.4
    assert report.summary("neighborhood").mean >= 0.5


def test_edit_records_layers_and_undo_is_bit_exact(fm, trained):
    m, f = fm.model, fm.facts[30]
    before = _weights(m)
    edit = ie.edit(m, [ie.EditRequest(f.template, f.subject, "Oslo", f.attribute)],
                   method="mend", editor=trained[0])
    assert edit.info["layers"] == [1, 2, 3] and edit.info["layer_choice"] == "last"
    assert m.next_token_probs(f.prompt, "Oslo") > 0.5
    edit.undo()
    assert all(torch.equal(before[k], v) for k, v in _weights(m).items())
    # more passes: the weights between passes are put back bit for bit too
    edit = ie.edit(m, [ie.EditRequest(f.template, f.subject, "Oslo", f.attribute)],
                   method="mend", editor=trained[0], passes=3)
    assert 1 <= edit.info["passes"] <= 3
    edit.undo()
    assert all(torch.equal(before[k], v) for k, v in _weights(m).items())


def test_editor_round_trip_and_model_mismatch(fm, trained, tiny, tmp_path):
    editor = MENDEditor.load(trained[0], fm.model)
    copy = MENDEditor.load(editor.save(tmp_path / "copy.safetensors"), fm.model)
    assert copy.config == editor.config and copy.info == editor.info
    a, b = editor.state_dict(), copy.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    req = ie.EditRequest(fm.facts[0].template, fm.facts[0].subject, "Rome")
    da, db = editor.deltas(fm.model, [req]), copy.deltas(fm.model, [req])
    assert all(torch.equal(da[k], db[k]) for k in da)
    with pytest.raises(ModelMismatchError, match="trained for"):
        MENDEditor.load(trained[0], tiny)
    with pytest.raises(ModelMismatchError):
        ie.edit(tiny, [ie.EditRequest("{} works as a", tiny.tokenizer.decode([5]), "chef")],
                method="mend", editor=str(trained[0]))


def test_checkpoint_resumes_exactly(fm, data, tmp_path):
    cfg = TrainConfig(steps=12, val_every=6, val_n=2, patience=0, lr=1e-3, lr_lr=0.05)
    straight = train_editor(fm.model, data[0], data[1], cfg, out=tmp_path / "a.safetensors",
                            progress=False)
    half = TrainConfig(**{**cfg.__dict__, "steps": 6})
    train_editor(fm.model, data[0], data[1], half, out=tmp_path / "b.safetensors", progress=False)
    resumed = train_editor(fm.model, data[0], data[1], cfg, out=tmp_path / "b.safetensors",
                           progress=False)
    assert [r["step"] for r in resumed.history] == [0, 6, 12]
    untimed = [[{k: v for k, v in r.items() if k != "seconds"} for r in run.history]
               for run in (straight, resumed)]
    assert untimed[0] == untimed[1]  # the same validation metrics and losses at every step
    a = MENDEditor.load(tmp_path / "a.safetensors.ckpt" / "editor.safetensors").state_dict()
    b = MENDEditor.load(tmp_path / "b.safetensors.ckpt" / "editor.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = TrainConfig(**{**cfg.__dict__, "rank": 8})
    with pytest.raises(InterpEditError, match="other settings"):
        train_editor(fm.model, data[0], data[1], other, out=tmp_path / "b.safetensors",
                     progress=False)


def test_layer_choice(fm, data):
    m = fm.model
    assert choose_layers(m, data[0], TrainConfig())[:2] == (last_layers(m), "last")
    assert choose_layers(m, data[0], TrainConfig(layers=(0, 2)))[:2] == ((0, 2), "given")
    layers, how, evidence = choose_layers(m, data[0], TrainConfig(layers="traced", n_layers=2,
                                                                  trace_facts=3))
    assert how == "traced" and len(layers) == 2 and len(evidence["mlp_effects"]) == m.n_layers
    effects = torch.tensor(evidence["mlp_effects"])
    sums = [float(effects[i] + effects[i + 1]) for i in range(m.n_layers - 1)]
    start = max(range(len(sums)), key=lambda i: (sums[i], -i))  # the best adjacent pair
    assert layers == (start, start + 1) and "layers" in evidence["reason"]
    cfg = MENDConfig.for_model(m, layers, how)
    assert cfg.layer_choice == "traced" and cfg.shapes == ((64, 128),) * 2


def test_missing_editor_says_how_to_train(fm, monkeypatch, tmp_path):
    monkeypatch.setenv("INTERP_EDIT_CACHE", str(tmp_path))
    req = ie.EditRequest(fm.facts[0].template, fm.facts[0].subject, "Rome")
    with pytest.raises(InterpEditError, match="mend-train"):
        ie.edit(fm.model, [req], method="mend")
    with pytest.raises(InterpEditError, match="does not exist"):
        ie.edit(fm.model, [req], method="mend", editor=str(tmp_path / "nope.safetensors"))


def test_untrained_preconditioned_contrastive_editor_takes_that_gradient_step(fm):
    m, f = fm.model, fm.facts[0]
    layers = (2, 3)
    cfg = MENDConfig.for_model(m, layers, "given", rank=4, init_edit_lr=0.5, precondition=True,
                               contrast=True)
    editor = MENDEditor(cfg).eval()
    spd = {}
    for layer in layers:
        a = torch.randn(128, 128) / 128**0.5
        spd[layer] = a @ a.T + torch.eye(128)
        editor.set_preconditioner(layer, spd[layer])
    req = ie.EditRequest(f.template, f.subject, "Rome Paris", f.attribute)
    weights = [m.mlp_out_proj(layer).weight for layer in layers]
    for w in weights:
        w.requires_grad_(True)
    try:  # the contrastive loss: mean NLL of the new target minus that of the true one
        n_new, n_true = len(m.target_ids(req.target_new)), len(m.target_ids(req.target_true))
        loss = (m.target_logprobs([req.text], [req.target_true], grad=True) / n_true
                - m.target_logprobs([req.text], [req.target_new], grad=True) / n_new).sum()
        grads = torch.autograd.grad(loss, weights)
    finally:
        for w in weights:
            w.requires_grad_(False)
    deltas = editor.deltas(m, [req])
    for layer, grad in zip(layers, grads):
        got = deltas[parameter_name(m, m.mlp_out_proj(layer))]
        assert torch.allclose(got, -0.5 * grad @ spd[layer], atol=1e-5, rtol=1e-4)
    with pytest.raises(InterpEditError, match="preconditioner"):
        MENDEditor(MENDConfig.for_model(m, layers, "given")).set_preconditioner(2, spd[2])


def test_more_passes_go_on_until_the_new_target_wins(fm, tmp_path):
    m, f = fm.model, fm.facts[3]
    cfg = MENDConfig.for_model(m, (2, 3), "given", rank=4, init_edit_lr=0.02, contrast=True)
    path = MENDEditor(cfg).save(tmp_path / "untrained.safetensors")
    new = next(a for a in RELATIONS[f.relation][1] if a != f.attribute)
    req = ie.EditRequest(f.template, f.subject, new, f.attribute)
    before = {k: v.detach().clone() for k, v in m.hf_model.named_parameters()}
    p_new = []
    for passes in (1, 4):
        edit = ie.edit(m, [req], method="mend", editor=str(path), passes=passes)
        p_new.append(m.next_token_probs(f.prompt, new))
        edit.undo()
    assert edit.info["passes"] > 1 and p_new[1] > p_new[0]
    assert all(torch.equal(v, before[k]) for k, v in m.hf_model.named_parameters())
    with pytest.raises(InterpEditError, match="passes"):
        ie.edit(m, [req], method="mend", editor=str(path), passes=0)


def test_blocks_below_the_edit_in_bf16_give_nearly_the_same_edit(fm, tmp_path):
    """below="bfloat16" rounds only the edited blocks' input: the edit is within a few
    percent of below="model" (not equal), and the choice is recorded."""
    m, f = fm.model, fm.facts[3]
    cfg = MENDConfig.for_model(m, (2, 3), "given", rank=4, init_edit_lr=0.02, contrast=True)
    path = MENDEditor(cfg).save(tmp_path / "untrained.safetensors")
    req = ie.EditRequest(f.template, f.subject, "Rome", f.attribute)
    edits = {}
    for below in ("model", "bfloat16"):
        edits[below] = ie.edit(m, [req], method="mend", editor=str(path), passes=1, below=below)
        edits[below].undo()
        assert edits[below].info["below"] == below
    for name, d in edits["model"].deltas.items():
        other = edits["bfloat16"].deltas[name]
        assert not torch.equal(d, other) and float((d - other).norm() / d.norm()) < 0.05
    with pytest.raises(InterpEditError, match="below"):
        ie.edit(m, [req], method="mend", editor=str(path), below="fp8")


def _same_factors(run, ref, layers) -> None:
    torch.testing.assert_close(run.logits, ref.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(run.logprobs, ref.logprobs, rtol=0, atol=1e-5)
    for layer in layers:
        (u, d), (u_ref, d_ref) = run.factors[layer], ref.factors[layer]
        assert u.shape == u_ref.shape and u.shape[0] > 0
        torch.testing.assert_close(u, u_ref, rtol=1e-5, atol=1e-6)
        # fp32 rounding of two summation orders: 1e-6 is 1e-5 of the factors' scale (~0.1)
        torch.testing.assert_close(d, d_ref, rtol=1e-4, atol=1e-6)


def test_stepper_factors_equal_the_hooked_ones(fm):
    """The layer-stepper pass (used when no hook is installed) and the bridge pass with capture
    and delta hooks give the same factors, logits and log-probs, fresh and resumed."""
    from interp_edit.editing.mend_factors import _hooked_factors, _stepper_factors
    from interp_edit.resume import block_input

    m, layers = fm.model, (1, 3)
    batch = TargetBatch.build(m, [fm.facts[2].prompt, fm.facts[2].prompt, fm.facts[9].prompt],
                              ["Oslo", fm.facts[2].attribute, "Rome Paris"])
    rows, away = [0, 2], [1]
    hooked_run = _hooked_factors(m, layers, batch, rows, away, None)
    stepper_run = _stepper_factors(m, layers, batch, rows, away, block_input(m, batch.ids, 1))
    resumed = _hooked_factors(m, layers, batch, rows, away, hooked_run.start)
    for run in (stepper_run, resumed):
        _same_factors(run, hooked_run, layers)


def test_check_gaps_read_two_unembedding_rows_where_the_normaliser_cancels(fm):
    """The check between passes: where both answers are one token after the same prompt the
    gap is logit(new) − logit(old) (two rows of the unembedding); it equals the gap of the
    full log-softmax, and pairs without that shape take the full path (same numbers again)."""
    from interp_edit.editing.mend_factors import gaps_from
    from interp_edit.resume import block_input, record_block_input

    m, f, g = fm.model, fm.facts[2], fm.facts[9]
    batch = TargetBatch.build(m, [f.prompt, f.prompt, g.prompt, g.prompt],
                              ["Oslo", f.attribute, "Rome Paris", g.attribute])
    one, many = (0, 1), (2, 3)
    assert batch.one_token_after_same_prompt(*one)
    assert not batch.one_token_after_same_prompt(*many)
    start = block_input(m, batch.ids, 2)
    with torch.no_grad():
        full = batch.logprob_gaps(m.logits(batch.ids, batch.keep), [one, many])
    short = gaps_from(m, batch, start, [one])
    cut = gaps_from(m, batch, block_input(m, batch.ids[:, : batch.width], 2), [one])
    mixed = gaps_from(m, batch, start, [one, many])
    with record_block_input(m, 2) as rec:  # a bridge input: always the full path
        m.logits(batch.ids, [-1])
    bridge = gaps_from(m, batch, rec.value, [one, many])
    for gaps in (short, cut, mixed[:1], bridge[:1]):
        torch.testing.assert_close(gaps, full[:1], rtol=0, atol=1e-5)
    for gaps in (mixed[1:], bridge[1:]):
        torch.testing.assert_close(gaps, full[1:], rtol=0, atol=1e-5)


def test_passes_stop_at_the_last_prediction_position(fm):
    """TargetBatch.width: a pass needs the positions up to the last one that predicts a target
    token. Cut there, the factors, log-probs and logits equal the whole batch's (a row's last
    token predicts nothing, so its gradient is zero), and the two one-token answers of one
    prompt leave equal rows (which block_input then runs once) that predict at the last
    position only (the last block then computes that position alone)."""
    from interp_edit.editing.mend_factors import _hooked_factors, _stepper_factors
    from interp_edit.resume import block_input

    m, f, g = fm.model, fm.facts[2], fm.facts[9]
    pair = TargetBatch.build(m, [f.prompt, f.prompt], ["Oslo", f.attribute])
    assert pair.one_token_after_same_prompt(0, 1)
    assert pair.width == pair.spans[0][0] == len(m.tokenize(f.prompt))
    assert torch.equal(pair.ids[0, : pair.width], pair.ids[1, : pair.width])
    layers = (1, 3)
    # cut there, every row predicts at the last position: the last block computes it alone
    whole = _hooked_factors(m, layers, pair, [0], [1], None)
    cut = _stepper_factors(m, layers, pair, [0], [1],
                           block_input(m, pair.ids[:, : pair.width], 1))
    _same_factors(cut, whole, layers)
    batch = TargetBatch.build(m, [f.prompt, f.prompt, g.prompt],
                              ["Oslo", f.attribute, "Rome Paris"])
    assert batch.width == max(s + n - 1 for s, n in batch.spans) < batch.ids.shape[1]
    rows, away = [0, 2], [1]
    whole = _stepper_factors(m, layers, batch, rows, away, block_input(m, batch.ids, 1))
    cut = _stepper_factors(m, layers, batch, rows, away,
                           block_input(m, batch.ids[:, : batch.width], 1))
    _same_factors(cut, whole, layers)



def test_a_damaged_checkpoint_is_refused_by_name(fm, data, tmp_path):
    cfg = TrainConfig(steps=2, val_every=2, val_n=1, patience=0)
    out = tmp_path / "e.safetensors"
    train_editor(fm.model, data[0], data[1], cfg, out=out, progress=False)
    ckpt = tmp_path / "e.safetensors.ckpt"
    longer = TrainConfig(**{**cfg.__dict__, "steps": 4})
    for name in ("state.json", "optimizer.safetensors", "editor.safetensors"):
        whole = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(whole[: len(whole) // 2])
        with pytest.raises(CorruptFileError, match=f"{ckpt / name}.*(delete the checkpoint|"
                                                   "train it again)"):
            train_editor(fm.model, data[0], data[1], longer, out=out, progress=False)
        (ckpt / name).write_bytes(whole)
    assert train_editor(fm.model, data[0], data[1], longer, out=out,
                        progress=False).history[-1]["step"] == 4
