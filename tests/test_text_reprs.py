"""What a user sees when printing results: the numbers the README promises, the table's content, no noise."""

from __future__ import annotations

import re
import warnings

import torch

import factlens
from factlens.recall.lens import logit_lens
from factlens.recall.report import analyze


def test_printed_records_show_calls_change_and_max_delta():
    model = factlens.tiny("gpt2")
    tokens = model.to_tokens("The capital of France is")
    with factlens.intervene(model, factlens.add_vector(model, torch.ones(model.cfg.d_model), hook_name="blocks.0.hook_resid_post")) as run:
        model(tokens)
    text = str(run.records)
    record = next(iter(run.records.values()))
    assert record.changed and f"max |Δ| {factlens.display.fmt(record.max_abs_change)}" in text
    assert re.search(r"1 call\(s\), changed", text)


def test_print_shows_a_results_table_content():
    from factlens.display import MAX_PRINT_ROWS

    model = factlens.tiny("gpt2")
    ds = factlens.capitals.dataset(model, n=6)
    lens = logit_lens(model, ds, progress=False)
    df = lens.to_dataframe()
    text = str(lens)
    assert text.startswith(repr(lens))
    for column in df.columns:
        assert column in text
    assert len(text.splitlines()) >= min(len(df), MAX_PRINT_ROWS) + 2


def test_capitals_report_speaks_plainly(tmp_path, capsys):
    report = analyze(factlens.tiny("gpt2"), folds=2, out_dir=tmp_path, progress=True)  # 15 prompts per subject
    err = capsys.readouterr().err
    assert "capitals analysis" in err and "pass A" not in err and "D_new" not in err  # one display, plain words
    text = report.to_markdown()
    assert "Random weights" in text.split("| quantity")[0]  # the HTML banner's warning, on the console too
    for raw in ("| P a |", "| P b |", "| prob_before |", "| seconds |"):
        assert raw not in text, raw
    html = (tmp_path / "report.html").read_text()
    assert not re.search(r"\d\.\de\+0\d s", html)  # wall times in seconds, not 3.6e+02 s
    titles = re.findall(r'"title":\{"text":"(MLP\d[^"]*)"', html)
    assert len(titles) == len(set(titles)) >= 2  # pooled and per-subject figures are told apart
    subjects = set(report.dataset.to_dataframe()["subject"])
    start = html.index("read through the unembedding, per subject")
    table = html[start:html.index("</table>", start)]
    assert len(subjects) > 1 and all(s in table for s in subjects)  # every subject, not the first one's rows


def test_generate_prints_no_transformers_future_warning():
    model = factlens.tiny("gpt2")
    tokens = model.to_tokens("The capital of France is")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(tokens, max_new_tokens=2, do_sample=False, verbose=False)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
