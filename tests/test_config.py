"""Experiment configs: every file loads, and every kind of mistake fails with one clear line."""
import subprocess
import sys
from pathlib import Path

import pytest

from nova3d.config import ConfigError, ExperimentConfig, list_experiments, load_experiment
from nova3d.fusion.config import FusionExperimentConfig
from nova3d.models.autoencoder import AutoencoderExperimentConfig


def test_every_experiment_file_loads_and_validates():
    names = list_experiments()
    assert {"base", "tiny", "gta_full", "ablations/no_gta", "toy", "ablations/toy_no_gta", "autoencoder/toy"} <= set(names)
    assert {"fusion/default", "fusion/no_conflict", "fusion/no_pose_refine", "fusion/no_mask",
            "fusion/no_sparse"} <= set(names)
    for name in names:
        cfg = load_experiment(name)
        schema = (FusionExperimentConfig if name.startswith("fusion/") else
                  AutoencoderExperimentConfig if name.startswith("autoencoder/") else ExperimentConfig)
        assert isinstance(cfg, schema), name
        assert cfg.name == name


@pytest.mark.parametrize("name,knob,value", [
    ("fusion/no_conflict", "loss.conflict_maps", False), ("fusion/no_pose_refine", "optim.pose_refine", False),
    ("fusion/no_mask", "loss.mask", 0.0), ("fusion/no_sparse", "loss.sparsity", 0.0)])
def test_fusion_ablation_changes_only_its_knob(name, knob, value):
    default, ablation = load_experiment("fusion/default"), load_experiment(name)
    section, key = knob.split(".")
    assert getattr(getattr(ablation, section), key) == value != getattr(getattr(default, section), key)
    setattr(getattr(ablation, section), key, getattr(getattr(default, section), key))
    ablation.name = default.name
    assert ablation == default


def test_fusion_overrides_and_typos():
    cfg = load_experiment("fusion/default", ["optim.steps=7", "field.hashgrid.levels=4", "render.occupancy=null"])
    assert (cfg.optim.steps, cfg.field.hashgrid.levels, cfg.render.occupancy) == (7, 4, None)
    with pytest.raises(ConfigError, match="optim.stepz"):
        load_experiment("fusion/default", ["optim.stepz=7"])


def test_fusion_config_digest_follows_the_resolved_config_not_the_override_list():
    """Bench caches key fit results by it: a changed default must make them stale, a restated one must not."""
    from nova3d.fuse import fusion_config_digest

    default = fusion_config_digest(())
    assert fusion_config_digest(("export.cut_unseen_top=true",)) == default  # restates the default
    assert fusion_config_digest(("export.cut_unseen_top=false",)) != default
    assert fusion_config_digest(()) == default  # stable between calls


def test_ablation_changes_only_its_knob():
    full, ablation = load_experiment("gta_full"), load_experiment("ablations/no_gta")
    assert (full.model.gta_spatial, full.model.gta_temporal) == (True, True)
    assert (ablation.model.gta_spatial, ablation.model.gta_temporal) == (False, False)
    ablation.model.gta_spatial = ablation.model.gta_temporal = True
    ablation.name = full.name
    assert ablation == full


def test_overrides_apply_with_types():
    cfg = load_experiment("tiny", ["trainer.max_steps=7", "data.resolution=32", "system.lr=0.5"])
    assert (cfg.trainer.max_steps, cfg.data.resolution, cfg.system.lr) == (7, 32, 0.5)


def _write(root: Path, name: str, text: str) -> None:
    path = root / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("files,name,overrides,expected", [
    ({"a": "data:\n  resolutoin: 64\n"}, "a", [], ["a.yaml", "data.resolutoin"]),
    ({"a": "trainer:\n  max_steps: lots\n"}, "a", [], ["a.yaml", "trainer.max_steps"]),
    ({"a": "parent: nope\n"}, "a", [], ["a.yaml", "parent 'nope' not found"]),
    ({"a": "parent: b\n", "b": "parent: a\n"}, "a", [], ["parent cycle", "a -> b -> a"]),
    ({"a": "data: [1, 2\n"}, "a", [], ["a.yaml", "not valid YAML"]),
    ({"a": "- 1\n"}, "a", [], ["a.yaml", "expected a mapping"]),
    ({"a": "seed: 1\n"}, "missing", [], ["missing.yaml", "not found"]),
    ({"a": "seed: 1\n"}, "a", ["model.gta_spatial=maybe"], ["command line", "model.gta_spatial"]),
    ({"a": "seed: 1\n"}, "a", ["seed"], ["command line", "key=value"]),
])
def test_config_errors_name_the_key_and_file(tmp_path, files, name, overrides, expected):
    for file_name, text in files.items():
        _write(tmp_path, file_name, text)
    with pytest.raises(ConfigError) as info:
        load_experiment(name, overrides, root=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in expected:
        assert fragment in message


def test_cli_config_prints_resolved_yaml_and_fails_in_one_line():
    ok = subprocess.run([sys.executable, "-m", "nova3d.cli", "config", "tiny", "trainer.max_steps=3"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "max_steps: 3" in ok.stdout and "name: tiny" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "nova3d.cli", "config", "tiny", "data.nope=1"],
                         capture_output=True, text=True)
    assert bad.returncode != 0
    assert bad.stderr.strip().count("\n") == 0 and "data.nope" in bad.stderr
