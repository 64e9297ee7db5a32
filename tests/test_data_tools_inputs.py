"""The toy data tool and the VAE trainer on bad input (issue 25): their own flags named, a dropped
render said on the terminal, inputs checked before a finished run's files are touched."""
from __future__ import annotations

from pathlib import Path

import pytest

from data_prep import toy_data
from data_prep.render_io import RenderSummary
from data_prep.write_shards import Rejected, ShardSummary
from nova3d.train_vae import main as vae_main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("argv, said", [
    (["--resolution", "0"], "--resolution must be >= 8, got 0"),
    (["--samples", "-2"], "--samples must be >= 1, got -2"),
    (["--seed", "-1"], "--seed must be a whole number"),
])
def test_toy_data_names_its_own_flags(argv, said, tmp_path, capsys):
    assert toy_data.main(["--out", str(tmp_path / "toy"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"toy_data: error: {said}" or (err.startswith("toy_data: error: ") and said in err), err
    assert "--views" not in err and "--limit" not in err  # render_views' flags, which toy_data has not
    assert not (tmp_path / "toy").exists()


def test_toy_data_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert toy_data.main(["--out", str(tmp_path / "f"), "--splits", "val"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_toy_data_says_which_renders_were_not_packed_and_why(tmp_path, monkeypatch, capsys):
    """A render dropped as corrupt used to be mentioned only in manifest.json."""
    from data_prep import render_views, write_shards

    monkeypatch.setattr(render_views, "render_objects", lambda sources, out, settings, progress: RenderSummary(
        rendered=[s.object_id for s in sources]))
    bad = Rejected("toy-s0-00003", "renders/val/toy-s0-00003", "corrupt", "rgb/004.png: cannot read the image")
    monkeypatch.setattr(write_shards, "write_shards", lambda *a, **k: ShardSummary(Path("s"), Path("m"), [], [bad]))
    assert toy_data.main(["--out", str(tmp_path / "toy"), "--splits", "val", "--count", "40"]) == 0
    captured = capsys.readouterr()
    assert ("toy_data: val: toy-s0-00003 not packed [corrupt]: rgb/004.png: cannot read the image"
            in captured.err.splitlines())
    assert "1 rejected" in captured.out


def test_train_vae_yaml_path_that_does_not_exist(tmp_path, capsys):
    assert vae_main([str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope.yaml: no such file" in err and "nope.yaml.yaml" not in err and len(err.splitlines()) == 1


def test_train_vae_checks_inputs_before_touching_a_finished_run(tmp_path, capsys):
    """It used to rewrite the run's config.yaml and command.txt (recording nova3d.train) first."""
    from nova3d.config import load_experiment
    from nova3d.run_dir import run_dir_for

    run = run_dir_for(load_experiment("autoencoder/toy", [f"logging.root={tmp_path / 'runs'}"]), env={}).path
    run.mkdir(parents=True)
    files = {"config.yaml": "the finished run's config\n", "command.txt": "python -m nova3d.train_vae toy\n"}
    for name, text in files.items():
        (run / name).write_text(text)
    code = vae_main(["autoencoder/toy", f"logging.root={tmp_path / 'runs'}",
                     f"data.train_shards={tmp_path / 'no_shards'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("nova3d.train_vae: error:") and "no_shards" in err, err
    assert {p.name: p.read_text() for p in run.iterdir()} == files, run


def test_train_vae_snapshot_records_its_own_command(tmp_path):
    from nova3d.config import load_experiment
    from nova3d.run_dir import RunDir
    from nova3d.train_vae import write_run_snapshot

    run = RunDir(tmp_path / "run")
    write_run_snapshot(run, load_experiment("autoencoder/toy"), ["autoencoder/toy", "trainer.max_steps=3"])
    command = (tmp_path / "run" / "command.txt").read_text()
    assert "-m nova3d.train_vae autoencoder/toy trainer.max_steps=3" in command and "nova3d.train " not in command
    assert (tmp_path / "run" / "config.yaml").read_text().strip()


def test_train_vae_conditioner_write_that_fails_keeps_the_previous_one(tmp_path, monkeypatch):
    """write_conditioner deleted the finished conditioner before moving the new one in."""
    from types import SimpleNamespace

    from nova3d import train_vae
    from nova3d.config import load_experiment

    out = tmp_path / "conditioner"
    (out / "vae").mkdir(parents=True)
    (out / "vae" / "weights").write_text("the finished run's VAE")

    def save_into(name):
        return lambda folder: (Path(folder).mkdir(parents=True), (Path(folder) / name).write_text("new"))

    def full_disk(folder):
        raise OSError(28, "No space left on device")

    clip = SimpleNamespace(save_pretrained=save_into("clip"))
    monkeypatch.setattr(train_vae, "build_clip", lambda model, seed: (clip, SimpleNamespace(save_pretrained=full_disk)))
    system = SimpleNamespace(vae=SimpleNamespace(save_pretrained=save_into("vae")))
    with pytest.raises(OSError):
        train_vae.write_conditioner(system, load_experiment("autoencoder/toy"), out, {"rgb_psnr": 1.0})
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == [
        "conditioner", "conditioner/vae", "conditioner/vae/weights"]  # no conditioner.partial left
    assert (out / "vae" / "weights").read_text() == "the finished run's VAE"


def test_write_shards_out_that_is_a_file(tmp_path, capsys):
    from data_prep.write_shards import main as shards_main

    (tmp_path / "renders").mkdir()
    (tmp_path / "f").write_text("mine")
    assert shards_main([str(tmp_path / "renders"), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("write_shards: error:") and "is a file" in err and len(err.splitlines()) == 1, err
    assert (tmp_path / "f").read_text() == "mine"
