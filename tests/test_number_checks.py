"""Numbers are checked where they live, when the config is built (issue 25, class 3): before any
weights load or any fit starts, one line naming the option."""
from __future__ import annotations

import pytest

from nova3d import number_checks as num
from nova3d.cli import main
from nova3d.devices import check_device_name, resolve_device
from nova3d.errors import Nova3DError
from nova3d.fuse import load_fusion_config


@pytest.mark.parametrize("override, named", [
    ("optim.steps=0", "optim.steps"),  # used to export a mesh from an untrained field
    ("optim.steps=-3", "optim.steps"),
    ("optim.rays=0", "optim.rays"),
    ("optim.lr_grid=nan", "optim.lr_grid"),
    ("optim.lr_net=inf", "optim.lr_net"),
    ("optim.lr_color=0", "optim.lr_color"),
    ("optim.object_fraction=1.5", "optim.object_fraction"),
    ("optim.fit_resolution=2", "optim.fit_resolution"),
    ("optim.budget=huge", "optim.budget"),
    ("loss.color=-1", "loss.color"),
    ("loss.normal=nan", "loss.normal"),
    ("export.resolution=0", "export.resolution"),
    ("logging.turntable_frames=0", "logging.turntable_frames"),
    ("seed=-1", "seed"),
    ("seed=4294967296", "seed"),  # lightning.seed_everything would silently pick another seed
    ("device=meta", "device"),
    ("device=nonsense", "device"),
])
def test_fusion_numbers_are_refused_when_the_config_loads(override, named):
    with pytest.raises(Nova3DError, match=named.replace(".", r"\.")):
        load_fusion_config("fusion/default", [override])


def test_good_fusion_numbers_load():
    cfg = load_fusion_config("fusion/default", ["optim.steps=1", "seed=4294967295", "device=cpu", "loss.mask=0"])
    assert cfg.optim.steps == 1 and cfg.seed == 2**32 - 1


@pytest.mark.parametrize("args, named", [
    (["--guidance", "nan", "3"], "--guidance"),
    (["--guidance", "1", "inf"], "--guidance"),
    (["--guidance", "1", "1e9"], "--guidance"),
    (["--seed", str(2**64)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--steps", "0"], "--steps"),
    (["--device", "meta"], "meta"),
])
@pytest.mark.parametrize("command", ["generate", "image-to-3d"])
def test_sampling_numbers_fail_before_the_model_is_looked_at(command, args, named, tmp_path, capsys):
    """The model folder does not exist: the error names the number, so the check came first."""
    code = main([command, "--image", str(tmp_path / "img.png"), "--model", str(tmp_path / "nomodel"),
                 "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and named in err[0] and "nomodel" not in err[0], err
    assert not (tmp_path / "out").exists()


def test_image_to_3d_fusion_numbers_fail_before_generating(tmp_path, capsys):
    code = main(["image-to-3d", "--image", str(tmp_path / "img.png"), "--model", str(tmp_path / "nomodel"),
                 "--out", str(tmp_path / "out"), "optim.steps=0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "optim.steps" in err and "nomodel" not in err


def test_helpers_name_the_option():
    assert num.count("x", 3) == 3 and num.in_range("y", 0.5, 0, 1) == 0.5 and num.seed("s", 2**64 - 1)
    for call in (lambda: num.count("x", 1.5), lambda: num.count("x", True), lambda: num.positive("y", 0),
                 lambda: num.finite("z", "abc"), lambda: num.seed("s", 2**64)):
        with pytest.raises(Nova3DError, match=r"^[xyzs] must"):
            call()


def test_device_names():
    check_device_name("auto"), check_device_name("cpu"), check_device_name("cuda:1")
    assert resolve_device("cpu").type == "cpu"
    for bad in ("meta", "mps", "gpu0"):
        with pytest.raises(Nova3DError, match=bad):
            resolve_device(bad)
