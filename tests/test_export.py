"""`nova3d export`: a tiny run trained for 2 steps -> pipeline folder -> from_pretrained -> `nova3d generate`.

One training run (16², 4 views, EMA on) per module; the exports check that the UNet weights are
bit-exact copies of the checkpoint's (raw and EMA), that only safetensors hold weights, and that
bad input is one error line.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from data_prep.write_shards import write_shards
from nova3d.cli import main
from nova3d.config import load_experiment
from nova3d.data import schema
from nova3d.errors import Nova3DError
from nova3d.export import export_checkpoint
from nova3d.pipeline import Nova3DPipeline
from nova3d.run_dir import run_dir_for
from nova3d.train import run_training
from tests.helpers_objects import make_object_folder

pytestmark = pytest.mark.usefixtures("one_thread")
VIEWS, RES = 4, 16


def _overrides(shards: Path, root: Path) -> list[str]:
    """tests/test_train.py's fast-tier shrink of the tiny experiment, with EMA on."""
    return [
        "model.pretrained=null", "model.architecture=tiny", f"data.resolution={RES}", f"data.num_views={VIEWS}",
        f"data.train_shards={shards}", "data.val_shards=null", "data.num_workers=0", "data.batch_size=1",
        "data.samples_per_epoch=4", "data.shuffle_buffer=2", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.num_nodes=1", "trainer.strategy=auto", "trainer.precision=32-true", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "trainer.checkpoint_every_n_steps=2", "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1", "system.val_num_objects=0",
        "system.val_sampling_steps=2", "system.ema_decay=0.9", f"logging.root={root}",
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> Path:
    renders = tmp_path_factory.mktemp("renders")
    for i in range(2):
        make_object_folder(renders, f"obj{i}", views=16, res=32, seed=i)
    shards = tmp_path_factory.mktemp("shards")
    write_shards(renders, shards, progress=False)
    root = tmp_path_factory.mktemp("runs")
    cfg = load_experiment("tiny", _overrides(shards, root))
    run_training(cfg, ["test_export"])
    return run_dir_for(cfg).path


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _image(path: Path) -> Path:
    arr = np.zeros((64, 64, 4), np.uint8)
    arr[12:52, 20:44] = (200, 30, 30, 255)
    PIL.Image.fromarray(arr, "RGBA").save(path)
    return path


@pytest.mark.parametrize("ema", [False, True])
def test_export_is_bit_exact_and_loads(run, tmp_path, ema):
    out = tmp_path / "pipe"
    result = export_checkpoint(run, out, ema=None if ema else False)
    assert result.ema == ema and result.global_step == 2 and result.checkpoint == run / "checkpoints" / "last.ckpt"
    assert not out.with_name("pipe.partial").exists()
    weights = [p for p in out.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)  # nothing to unpickle
    ckpt = _checkpoint(run)
    raw = {k.removeprefix("unet."): v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")}
    expected = {**raw, **ckpt["ema"]["shadow"]} if ema else raw
    pipe = Nova3DPipeline.from_pretrained(str(out))
    got = pipe.unet.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    # EMA after 2 steps differs from the raw weights, so the two exports really differ.
    assert any(not torch.equal(raw[k], ckpt["ema"]["shadow"][k]) for k in ckpt["ema"]["shadow"])
    assert pipe.config.num_frames == VIEWS and pipe.config.resolution == RES and pipe.num_domains == 2


def test_half_precision_unet_export_halves_the_file_and_loads_as_float32(run, tmp_path):
    full, half = export_checkpoint(run, tmp_path / "full").out, tmp_path / "half"
    assert main(["export", str(run), "--out", str(half), "--unet-dtype", "float16"]) == 0
    name = Path("unet") / "gta_unet.safetensors"
    assert (half / name).stat().st_size < 0.6 * (full / name).stat().st_size
    a, b = Nova3DPipeline.from_pretrained(str(full)).unet, Nova3DPipeline.from_pretrained(str(half)).unet
    assert a.gta_config == b.gta_config and next(b.parameters()).dtype == torch.float32
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x.half().float(), y), k  # the stored values are the float16 roundings


def test_cli_export_then_generate(run, tmp_path, capfd):
    """...and a quiet console (nova3d.hub_noise): no diffusers/transformers progress bars or warnings,
    only nova3d's own denoising bar and summary lines (capfd: their loggers write to the real stderr)."""
    noise = ("Loading weights", "Loading pipeline components", "Writing model shards", "accelerate",
             "should be kept in float32")
    out = tmp_path / "pipe"
    assert main(["export", str(run / "checkpoints" / "last.ckpt"), "--out", str(out), "--no-ema"]) == 0
    captured = capfd.readouterr()
    assert "raw weights" in captured.out and not [n for n in noise if n in captured.out + captured.err]
    assert main(["export", str(run), "--out", str(out)]) == 2  # exists
    assert "already exists" in capfd.readouterr().err
    args = ["generate", "--image", str(_image(tmp_path / "box.png")), "--model", str(out),
            "--out", str(tmp_path / "gen"), "--steps", "2", "--device", "cpu"]
    assert main(args) == 0
    captured = capfd.readouterr()
    assert "denoising" in captured.err and not [n for n in noise if n in captured.out + captured.err]
    assert schema.missing_files(tmp_path / "gen" / "box") == []


@pytest.mark.parametrize("case", ["missing", "no_checkpoint", "corrupt", "not_nova3d", "no_ema", "safetensors",
                                  "pickled_object", "text_file"])
def test_bad_input_is_one_error_line(case, run, tmp_path, capsys):
    source, extra = tmp_path / "model.ckpt", []
    if case == "missing":
        source = tmp_path / "no_such_run"
    elif case == "no_checkpoint":
        source = tmp_path / "empty_run"
        (source / "checkpoints").mkdir(parents=True)
    elif case == "corrupt":
        source.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    elif case == "not_nova3d":
        torch.save({"state_dict": {}}, source)
    elif case == "safetensors":  # issue 25: named as such, not PyTorch's weights_only hint
        from safetensors.torch import save_file

        source = tmp_path / "weights.safetensors"
        save_file({"w": torch.zeros(2)}, source)
    elif case == "text_file":  # torch's legacy reader raised KeyError: 101 (a traceback)
        source.write_text("hello")
    elif case == "pickled_object":
        torch.save({"state_dict": {}, "hyper_parameters": {"config": {}}, "obj": Path("x")}, source)
    else:
        ckpt = _checkpoint(run)
        del ckpt["ema"]
        torch.save(ckpt, source)
        extra = ["--ema"]
    code = main(["export", str(source), "--out", str(tmp_path / "pipe"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("nova3d export: error:"), err
    assert str(source) in err
    assert "weights_only" not in err and "trust" not in err  # PyTorch's advice to unpickle anything
    if case == "safetensors":
        assert "safetensors" in err and "not a training checkpoint" in err
    assert not (tmp_path / "pipe").exists()
    with pytest.raises(Nova3DError):
        export_checkpoint(run, tmp_path / "x", which="first")


def test_out_that_cannot_be_written_is_found_before_loading(run, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["export", str(run), "--out", str(tmp_path / "f" / "pipe")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is inside" in err and "a file, not a folder" in err and len(err.splitlines()) == 1


def test_a_failed_overwrite_keeps_the_old_pipeline(run, tmp_path, monkeypatch):
    """--overwrite used to delete OUT before renaming the new one in: a failure or kill then lost both."""
    out = tmp_path / "pipe"
    export_checkpoint(run, out)
    old = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def refuse_partial(rename):  # the new folder cannot be moved in (a full disk, a signal at that moment)
        def move(src, dst, *args):
            if str(src).endswith(".partial"):
                raise OSError(28, "No space left on device")
            return rename(src, dst, *args)
        return move

    monkeypatch.setattr("os.replace", refuse_partial(os.replace))
    monkeypatch.setattr(Path, "rename", refuse_partial(Path.rename))
    with pytest.raises(OSError, match="No space left"):
        export_checkpoint(run, out, overwrite=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no pipe.partial or pipe.old
