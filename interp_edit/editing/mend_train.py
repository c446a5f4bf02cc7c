"""Meta-training a MEND editor (Mitchell et al. 2022) on edit records.

Each step draws one record and

1. takes the raw gradient factors of its edit (x = the edit prompt, y = ``target_new``; with
   ``contrast``, minus the NLL of ``target_true``) on the unedited model
   (:func:`interp_edit.editing.mend_factors.gradient_factors`);
2. turns them into ΔW with the editor and runs the model with W + ΔW substituted
   (:func:`substituted`: differentiable, the model's parameters are never trained);
3. loss = ``c_edit`` × NLL(target_new | edit prompt and its paraphrase, edited weights)
        + ``c_loc`` × KL(original ‖ edited) of the next-token distributions that predict the
          true answer of the record's neighbour prompt (a retain example: same relation, other
          subject, whose answer must not change; the positions that decide the neighbourhood
          score, rather than every token as in MEND's NQ retain set)
        + ``c_margin`` × [softplus(log p(true) − log p(new) + 1) on the edit prompts
          + softplus(log p(new) − log p(neighbour's answer) + 1) on the neighbour prompt]:
          the comparisons that efficacy and neighbourhood make (mean per-token
          log-probabilities), as soft margins (0: MEND's two losses only);
4. one Adam step on the editor (the network, and the log step sizes at ``lr_lr``).

Every ``val_every`` steps (and at step 0) the editor is saved as a resumable checkpoint
(editor + optimizer as safetensors, the rest as JSON) and validated with the evaluation
harness (``evaluate(..., method="mend")``: efficacy, paraphrase, neighbourhood) on the first
``val_n`` validation records that the model knows. The best editor (efficacy + neighbourhood)
is written to ``out``; training stops early after ``patience`` validations without improvement,
or when ``max_minutes`` have passed.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interp_edit import _files
from interp_edit import _validate as check
from interp_edit.arch import adapter
from interp_edit.editing.mend import MENDConfig, MENDEditor, last_layers
from interp_edit.editing.mend_factors import TargetBatch, batch_factors, gradient_factors
from interp_edit.errors import InterpEditError
from interp_edit.evaluation.records import EditRecord
from interp_edit.models import Model
from interp_edit.resume import logits_from

STATE_FORMAT = "interp_edit.MENDCheckpoint/1"


@dataclass(frozen=True)
class TrainConfig:
    """Meta-training settings. The defaults train a usable editor for the default model."""

    steps: int = 3000
    layers: str | tuple[int, ...] = "last"  # "last" (MEND) | "traced" (location-aware) | indices
    n_layers: int = 3  # how many layers "last" and "traced" pick
    rank: int = 128
    n_blocks: int = 1
    init_edit_lr: float = 1e-4
    # initial α_l such that ‖ΔW_l‖ = init_step · ‖W_l‖ for the median of `calibrate` training
    # edits (None: init_edit_lr for every layer)
    init_step: float | None = None
    calibrate: int = 16
    # corpus of the key statistics C_l that precondition û_t (None: no preconditioning, as in
    # MEND); see interp_edit.editing.stats.second_moments
    key_stats: str | None = None
    key_tokens: int = 100_000
    key_ridge: float = 0.01  # C_l + key_ridge · mean(diag C_l) · I is inverted
    contrast: bool = False  # the editor's input gradient also pushes target_true down
    lr: float = 1e-4  # Adam on the network
    lr_lr: float = 1e-2  # Adam on the log step sizes
    c_edit: float = 1.0
    c_loc: float = 1.0
    c_margin: float = 0.0  # weight of the soft margins on p(new) vs p(true) (module docstring)
    rephrase: bool = True  # the edit loss also scores the record's first paraphrase
    retain_divergence: str = "symmetric"  # "forward": MEND's KL(original ‖ edited) only
    grad_clip: float = 100.0
    val_every: int = 100
    val_n: int = 40
    patience: int = 6  # validations without improvement before stopping; 0: never stop early
    max_minutes: float | None = None
    seed: int = 0
    trace_facts: int = 8  # records traced to pick layers="traced"

    def __post_init__(self) -> None:
        if isinstance(self.layers, (list, tuple)):
            layers = tuple(check.integer("TrainConfig.layers entry", x, 0)
                           for x in self.layers)
            if not layers:
                raise InterpEditError("TrainConfig.layers is empty: give layer indices")
            object.__setattr__(self, "layers", layers)
        elif self.layers not in ("last", "traced"):
            raise InterpEditError(f"layers={self.layers!r}: use 'last', 'traced' or indices")
        if self.retain_divergence not in ("forward", "symmetric"):
            raise InterpEditError("retain_divergence must be 'forward' or 'symmetric'")
        check.fields(self, counts=("steps", "n_layers", "val_every", "val_n", "rank",
                                       "n_blocks", "key_tokens", "trace_facts"),
                         positive=("init_edit_lr", "lr", "lr_lr", "grad_clip"),
                         nonnegative=("key_ridge", "c_edit", "c_loc", "c_margin"),
                         seeds=("seed",))
        object.__setattr__(self, "calibrate", check.count("TrainConfig.calibrate",
                                                              self.calibrate, 0))
        object.__setattr__(self, "patience", check.count("TrainConfig.patience",
                                                             self.patience, 0))
        for name in ("init_step", "max_minutes"):
            if getattr(self, name) is not None:
                check.fields(self, positive=(name,))


@dataclass(frozen=True)
class TrainResult:
    editor: MENDEditor  # the best editor (also written to ``out``)
    history: tuple[dict[str, Any], ...]  # one row per validation
    stopped: str  # why training ended


# ---- the edited forward pass ---------------------------------------------------------------
@contextmanager
def substituted(model: Model, weights: dict[int, Tensor]) -> Iterator[Model]:
    """Run ``model`` with the MLP output projections of some layers replaced by tensors
    (e.g. W + ΔW with a graph back to the editor). The parameters are put back on exit."""
    modules = {layer: model.mlp_out_proj(layer) for layer in weights}
    params = {layer: m.weight for layer, m in modules.items()}
    try:
        for layer, m in modules.items():
            del m.weight  # unregisters the parameter; a plain tensor attribute takes its place
            m.weight = weights[layer]
        yield model
    finally:
        for layer, m in modules.items():
            m.weight = params[layer]  # re-registers the parameter


def meta_loss(
    model: Model, editor: MENDEditor, record: EditRecord, cfg: TrainConfig
) -> tuple[Tensor, dict[str, float]]:
    """The meta-training loss of one record (see the module docstring)."""
    layers = editor.config.layers
    prompts = [record.text, *record.paraphrases[: int(cfg.rephrase)]]
    loc_prompt, loc_answer = record.neighborhood[0]
    n = len(prompts)
    # rows: target_new | prompts, the neighbour's answer | its prompt, and with a true target
    # target_true | prompts and target_new | the neighbour's prompt
    contrast = (cfg.c_margin > 0 or cfg.contrast) and record.target_true is not None
    rows = [(p, record.target_new) for p in prompts] + [(loc_prompt, loc_answer)]
    if contrast:
        rows += [(p, record.target_true) for p in prompts] + [(loc_prompt, record.target_new)]
    batch = TargetBatch.build(model, *zip(*rows))
    loc, edit_rows, true_rows = n, list(range(n)), list(range(n + 1, 2 * n + 1))
    loc_cols = batch.columns(loc)  # where the neighbour's answer is predicted
    away = true_rows[:1] if contrast and editor.config.contrast else []  # true | edit prompt
    run = batch_factors(model, layers, batch, [0], away=away)
    steps = editor(run.factors)
    to_parameter = adapter(model).to_parameter  # [d_model, d_mlp] -> the weight's orientation
    edited = {layer: model.mlp_out_proj(layer).weight + to_parameter(layer, steps[layer])
              for layer in layers}
    with substituted(model, edited):  # blocks below the first edited one are unchanged
        after = (logits_from(model, run.start, batch.keep) if run.start is not None
                 else model.logits(batch.ids, batch.keep))
    new_logp = batch.mean_logprobs(after, edit_rows)
    edit_loss = -new_logp.mean()
    base, now = run.logits[loc, loc_cols].log_softmax(-1), after[loc, loc_cols].log_softmax(-1)
    loc_loss = kl_divergence(base, now)
    if cfg.retain_divergence == "symmetric":
        loc_loss = loc_loss + kl_divergence(now, base)
    margin = torch.zeros(())
    if contrast and cfg.c_margin > 0:  # the metrics' comparisons, as soft margins
        true_logp = batch.mean_logprobs(after, true_rows)
        loc_logp = batch.mean_logprobs(after, [loc, 2 * n + 1])  # answer, new | neighbour
        margin = (F.softplus(true_logp - new_logp + 1).mean()  # p(new) > p(true)
                  + F.softplus(loc_logp[1] - loc_logp[0] + 1))  # p(answer) > p(new)
    loss = cfg.c_edit * edit_loss + cfg.c_loc * loc_loss + cfg.c_margin * margin
    parts = {"loss": loss, "edit_nll": edit_loss, "loc_kl": loc_loss, "margin": margin}
    return loss, {k: v.item() for k, v in parts.items()}


def kl_divergence(
    base: Float[Tensor, "... d_vocab"], edited: Float[Tensor, "... d_vocab"]
) -> Float[Tensor, ""]:
    """KL(base ‖ edited) of log-distributions, summed over the vocabulary, mean over the rest."""
    return (base.exp() * (base - edited)).sum(-1).mean()


# ---- layers -----------------------------------------------------------------------------------
def choose_layers(
    model: Model, records: Sequence[EditRecord], cfg: TrainConfig
) -> tuple[tuple[int, ...], str, dict[str, Any]]:
    """The edited layers, how they were chosen, and the evidence (per-layer MLP effects)."""
    if isinstance(cfg.layers, tuple):
        for layer in cfg.layers:
            model._check_layer(layer)
        return cfg.layers, "given", {}
    if cfg.layers == "last":
        return last_layers(model, cfg.n_layers), "last", {}
    from interp_edit.tracing.locate import locate

    # the records the model knows (p(true) > p(new)): the trace of an unknown fact says nothing
    known = []
    for rec in records:
        if len(known) == cfg.trace_facts:
            break
        p_true, p_new = model.next_token_probs([rec.text] * 2, [rec.target_true, rec.target_new])
        if p_true > p_new:
            known.append(rec)
    if not known:
        raise InterpEditError("layers='traced': the model knows none of the training records")
    # the n_layers contiguous layers of the largest summed MLP effect, anywhere in the depth
    loc = locate(model, known, kind="mlp", span=min(cfg.n_layers, model.n_layers),
                 search=(0.0, 1.0))
    return loc.layers, "traced", {"mlp_effects": [round(float(e), 5) for e in loc.effects],
                                  "traced_records": [r.case_id for r in known],
                                  "reason": loc.reason, **loc.settings}


# ---- training ---------------------------------------------------------------------------------
def train_editor(
    model: Model,
    train: Sequence[EditRecord],
    val: Sequence[EditRecord],
    cfg: TrainConfig = TrainConfig(),
    *,
    out: str | Path,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Meta-train an editor for ``model``; the best one is written to ``out``.

    ``checkpoint`` (default ``<out>.ckpt/``): a directory to save to every ``val_every`` steps;
    a run started with the same config and an existing checkpoint resumes from it.
    """
    out = Path(out)
    ckpt = Path(checkpoint) if checkpoint is not None else out.with_name(out.name + ".ckpt")
    train = [r for r in train if r.neighborhood]
    if not train:
        raise InterpEditError("no training record has a neighbour (retain) prompt")
    editor, opt, state = _start(model, train, cfg, ckpt, out)
    order = _Order(len(train), cfg.seed)
    t0, spent = time.perf_counter(), state["seconds"]
    bar = tqdm(total=cfg.steps, initial=state["step"], desc="mend-train", disable=not progress)
    window: list[dict[str, float]] = []
    stopped = "steps"
    if state["step"] == 0 and not state["history"]:
        _validate(model, editor, val, cfg, state, window, out, ckpt, opt, spent)
    while state["step"] < cfg.steps:
        record = train[order[state["step"]]]
        state["step"] += 1
        bar.update(1)
        try:
            editor.train()
            loss, parts = meta_loss(model, editor, record, cfg)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(editor.parameters(), cfg.grad_clip)
            opt.step()
            window.append(parts)
            bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items()}, refresh=False)
        except InterpEditError:  # a record this tokenizer cannot use (e.g. subject not found)
            pass
        seconds = spent + time.perf_counter() - t0
        out_of_time = cfg.max_minutes is not None and seconds > 60 * cfg.max_minutes
        if state["step"] % cfg.val_every == 0 or state["step"] == cfg.steps or out_of_time:
            row = _validate(model, editor, val, cfg, state, window, out, ckpt, opt, seconds)
            bar.write(_describe(row))
            if out_of_time:
                stopped = f"time budget of {cfg.max_minutes} minutes"
                break
            if cfg.patience and state["since_best"] >= cfg.patience:
                stopped = f"early stop: no improvement in {cfg.patience} validations"
                break
    bar.close()
    return TrainResult(MENDEditor.load(out, model), tuple(state["history"]), stopped)


class _Order:
    """Step -> record index: a fresh seeded shuffle each epoch (so a resumed run continues
    exactly where it stopped)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._epochs = n, seed, {}

    def __getitem__(self, step: int) -> int:
        epoch, i = divmod(step, self.n)
        if epoch not in self._epochs:
            perm = list(range(self.n))
            random.Random(f"{self.seed}-{epoch}").shuffle(perm)
            self._epochs = {epoch: perm}
        return self._epochs[epoch][i]


def _optimizer(editor: MENDEditor, cfg: TrainConfig) -> torch.optim.Adam:
    net = [p for n, p in editor.named_parameters() if n != "log_lr"]
    return torch.optim.Adam([{"params": net, "lr": cfg.lr},
                             {"params": [editor.log_lr], "lr": cfg.lr_lr}])


def _start(model, train, cfg, ckpt, out):
    """A fresh editor and optimizer, or those of the checkpoint in ``ckpt`` (same config)."""
    state_path = ckpt / "state.json"
    if state_path.exists():
        fix = f"delete the checkpoint directory {ckpt} (or pass another) to start afresh"
        with _files.reading(state_path, "MEND training checkpoint", fix):
            state = _files.read_json(state_path)
            _files.require(isinstance(state, dict) and state.get("format") == STATE_FORMAT,
                           f"it is not of format {STATE_FORMAT}")
            _files.require(isinstance(state.get("train_config"), dict),
                           "it has no train_config")
        if _fixed(state["train_config"]) != _fixed(_jsonable(cfg)):
            raise InterpEditError(
                f"checkpoint {ckpt} was made with other settings ({state.get('train_config')});"
                " delete it or pass another checkpoint directory to start afresh"
            )
        editor = MENDEditor.load(ckpt / "editor.safetensors", model)
        opt = _optimizer(editor, cfg)
        optimizer = ckpt / "optimizer.safetensors"
        with _files.reading(optimizer, "MEND training checkpoint", fix):
            opt.load_state_dict(_load_optimizer(optimizer, state["param_groups"]))
        state["train_config"] = _jsonable(cfg)
        return editor, opt, state
    layers, how, evidence = choose_layers(model, train, cfg)
    torch.manual_seed(cfg.seed)
    config = MENDConfig.for_model(model, layers, how, rank=cfg.rank, n_blocks=cfg.n_blocks,
                                  init_edit_lr=cfg.init_edit_lr,
                                  precondition=cfg.key_stats is not None,
                                  contrast=cfg.contrast)
    editor = MENDEditor(config, {"layer_evidence": evidence})
    if cfg.key_stats is not None:
        _set_preconditioners(model, editor, cfg)
    if cfg.init_step is not None:
        editor.info["calibrated_edit_lr"] = _calibrate(model, editor, train, cfg)
    state = {"format": STATE_FORMAT, "train_config": _jsonable(cfg), "step": 0, "seconds": 0.0,
             "best_score": None, "best_step": None, "since_best": 0, "history": []}
    return editor, _optimizer(editor, cfg), state


def _set_preconditioners(model: Model, editor: MENDEditor, cfg: TrainConfig) -> None:
    """P_l = (C_l + ridge)⁻¹ from the key statistics of ``cfg.key_stats`` (cached)."""
    from interp_edit.editing.stats import second_moments

    layers = editor.config.layers
    moments = second_moments(model, layers, cfg.key_stats, cfg.key_tokens)
    for layer in layers:
        c = moments[layer].double()
        c = c + cfg.key_ridge * c.diagonal().mean() * torch.eye(len(c), dtype=c.dtype,
                                                                device=c.device)
        editor.set_preconditioner(layer, torch.linalg.inv(c).float())
    editor.info["key_stats"] = {"corpus": str(cfg.key_stats), "n_tokens": cfg.key_tokens,
                                "ridge": cfg.key_ridge}


@torch.no_grad()
def _calibrate(model: Model, editor: MENDEditor, train: Sequence[EditRecord],
               cfg: TrainConfig) -> list[float]:
    """Set each α_l so that the untrained editor's ‖ΔW_l‖ / ‖W_l‖ is ``cfg.init_step`` for the
    median of the first ``cfg.calibrate`` training edits; returns the α_l."""
    layers, ratios = editor.config.layers, []
    editor.eval()
    for rec in train[: cfg.calibrate]:
        away = [rec.target_true] if editor.config.contrast else None
        steps = editor(gradient_factors(model, layers, [rec.text], [rec.target_new], away))
        ratios.append(torch.stack([steps[layer].norm() / model.mlp_out_proj(layer).weight.norm()
                                   for layer in layers]))
    median = torch.stack(ratios).median(0).values  # [layers]: ‖ΔW‖/‖W‖ at α = exp(log_lr)
    editor.log_lr += (cfg.init_step / median).log()
    return [float(f"{x:.4g}") for x in editor.log_lr.exp()]


def _validate(model, editor, val, cfg, state, window, out, ckpt, opt, seconds) -> dict[str, Any]:
    """Checkpoint, measure on the validation records, keep the best editor; returns the row."""
    from interp_edit.evaluation.harness import evaluate

    editor.info.update(step=state["step"], train_seconds=round(seconds, 1))
    state["seconds"] = seconds
    current = editor.save(ckpt / "editor.safetensors")
    report = evaluate(model, val, method="mend", editor=str(current), n=cfg.val_n,
                      n_unrelated=0, progress=False, seed=cfg.seed)
    metrics = {k: round(s.mean, 4) for k in ("efficacy", "paraphrase", "neighborhood")
               if (s := report.summary(k)) is not None}
    score = metrics.get("efficacy", 0.0) + metrics.get("neighborhood", 0.0)
    losses = {k: round(sum(w[k] for w in window) / len(window), 4)
              for k in (window[0] if window else ())}
    window.clear()
    row = {"step": state["step"], "seconds": round(seconds, 1), "val_records": report.n,
           **metrics, "score": round(score, 4), **losses,
           "edit_lr": [float(f"{x:.3g}") for x in editor.log_lr.detach().exp()]}
    state["history"].append(row)
    if state["best_score"] is None or score > state["best_score"]:
        state.update(best_score=score, best_step=state["step"], since_best=0)
        editor.info.update(validation=metrics, best_step=state["step"])
        with _files.atomic_path(out) as tmp:
            shutil.copyfile(editor.save(ckpt / "editor.safetensors"), tmp)
    else:
        state["since_best"] += 1
    editor.info["history"] = state["history"]
    _save_optimizer(opt, ckpt / "optimizer.safetensors", state)
    _files.write_json(ckpt / "state.json", state, indent=1)
    return row


def _describe(row: dict[str, Any]) -> str:
    keys = ("efficacy", "paraphrase", "neighborhood", "loss", "edit_nll", "loc_kl", "margin")
    return f"step {row['step']} ({row['seconds']:.0f}s): " + ", ".join(
        f"{k} {row[k]:.3f}" for k in keys if k in row)


def _save_optimizer(opt: torch.optim.Optimizer, path: Path, state: dict[str, Any]) -> None:
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, s in sd["state"].items() for k, v in s.items()}
    _files.save_safetensors(tensors, path)
    state["param_groups"] = sd["param_groups"]


def _load_optimizer(path: Path, param_groups: list[dict[str, Any]]) -> dict[str, Any]:
    per_param: dict[int, dict[str, Tensor]] = {}
    for key, value in _files.read_safetensors(path)[0].items():
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = value
    return {"state": per_param, "param_groups": param_groups}


def _jsonable(cfg: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg)))


def _fixed(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint (it may run longer)."""
    return {k: v for k, v in cfg.items() if k not in ("steps", "max_minutes", "patience")}
