"""``interp-edit trace`` on the tiny fact model."""

import interp_edit.models
from interp_edit.cli import main
from interp_edit.tracing import TraceResult, TraceSet


def test_trace_cli_writes_the_result_and_prints_top_cells(fm, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(interp_edit.models, "load_model", lambda name=None: fm.model)
    fact = fm.facts[0]
    out = tmp_path / "fig" / "trace.pdf"
    code = main(["trace", "--prompt", fact.prompt, "--subject", fact.subject, "--kind", "all",
                 "--samples", "2", "--window", "3", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "top mlp cells" in text and fact.attribute in text
    result = TraceSet.load(out.with_suffix(".npz"))
    assert result.attn.samples == 2 and result.mlp.window == 3
    assert out.exists() or "figure not written" in text


def test_trace_cli_reports_bad_input(fm, monkeypatch, capsys):
    monkeypatch.setattr(interp_edit.models, "load_model", lambda name=None: fm.model)
    code = main(["trace", "--prompt", fm.facts[0].prompt, "--subject", "Nobody", "--out", "x.pdf"])
    assert code == 2 and "not found" in capsys.readouterr().err


def test_trace_cli_screens_in_bf16_on_request(fm, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(interp_edit.models, "load_model", lambda name=None: fm.model)
    fact = fm.facts[0]
    out = tmp_path / "screen.pdf"
    code = main(["trace", "--prompt", fact.prompt, "--subject", fact.subject, "--samples", "2",
                 "--method", "attribution", "--precision", "bfloat16", "--out", str(out)])
    assert code == 0 and "(attribution, bfloat16, logodds)" in capsys.readouterr().out
    assert TraceResult.load(out.with_suffix(".npz")).precision == "bfloat16"
    code = main(["trace", "--prompt", fact.prompt, "--subject", fact.subject,
                 "--precision", "bfloat16", "--out", str(out)])
    assert code == 2 and "attribution' only" in capsys.readouterr().err

