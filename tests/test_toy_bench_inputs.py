"""bench/toy_generation.py on bad input (issue 25, class 1): a model that does not load is one line
before anything in --out is touched, and a run that fails part-way keeps the previous run's folder."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench import toy_generation as TG


def _previous_result(out):
    run = out / "toy"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text('{"psnr_generated": 16.66}')
    return {p.name: p.read_text() for p in run.iterdir()}


def test_a_model_that_does_not_load_is_one_line_and_out_is_untouched(tmp_path, capsys):
    out = tmp_path / "bench"
    before = _previous_result(out)
    code = TG.main(["--runs", f"toy={tmp_path / 'no_model'}", "--out", str(out), "--data", str(tmp_path / "no_data")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("toy_generation: error: ") and "no_model" in err[0], err
    assert {p.name: p.read_text() for p in (out / "toy").iterdir()} == before


def test_a_run_that_fails_part_way_keeps_the_previous_folder(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    before = _previous_result(out)
    monkeypatch.setattr(TG, "_pipeline", lambda model: SimpleNamespace(config=SimpleNamespace(resolution=64)))

    def fails(name, model, folder, run_dir, *rest):
        (run_dir / "views").mkdir(parents=True, exist_ok=True)  # something written, then a failure
        raise RuntimeError("generation failed")
    monkeypatch.setattr(TG, "bench_object", fails)
    with pytest.raises(RuntimeError, match="generation failed"):
        TG.bench_run("toy", tmp_path / "model", [tmp_path / "obj"], {}, out, 2, 0, None)
    assert {p.name: p.read_text() for p in (out / "toy").iterdir()} == before
    assert sorted(p.name for p in out.iterdir()) == ["toy"]  # no .partial left behind
