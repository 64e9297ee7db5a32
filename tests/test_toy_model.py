"""The shipped toy model (pretrained/toy) really generates: it beats the trivial baselines on unseen
objects, and the bounds it is held to fail when the sampler, the CFG halves or the domains break.

The objects are test-split members of the toy family (never trained on), rendered here with Blender
as `make toy-data` renders them. Baselines: the input view repeated for PSNR (the stronger of the two
trivial ones: at 64² a turning object keeps much of its silhouette), and the true input-view normals
repeated for the normal error. Bounds were set from measured values (docs/benchmarks.md, "Toy
recipe": intact +1.42 dB and -39.9°, 2026-12-07) with room for noise; each sabotage below is
measured to fail them (swapped domains by PSNR +0.30 dB and normals +0.7°, swapped CFG halves by
-4.5 dB and -6.5°, the backwards sampler by everything).
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nova3d.data.shards import read_object_folder
from nova3d.eval import generated_views as gv
from nova3d.models import edm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOY_MODEL = Path(__file__).resolve().parent.parent / "pretrained" / "toy"
OBJECTS = ("toy-s0-00000", "toy-s0-00020", "toy-s0-00040")  # test split
TRAIN_OBJECTS = 24  # the first training-split objects: their mean view, the weaker PSNR baseline (reported)
STEPS = 8
PSNR_MARGIN_DB = 0.8  # generated novel views beat the input view repeated by at least this
NORMAL_MARGIN_DEG = 30.0  # ... and the true input-view normals repeated by at least this many degrees
MIN_MASK_IOU = 0.6  # RGB and normal foregrounds of the same generated view agree


def _render(names, out) -> list[gv.Views]:
    from data_prep.render_io import ObjectSource, RenderSettings
    from data_prep.render_views import render_objects

    sources = [ObjectSource(n, f"procedural:{n}", procedural=n) for n in names]
    summary = render_objects(sources, out, RenderSettings(resolution=64, samples=8), progress=False)
    assert not summary.failed, summary.failed
    return [gv.Views.from_sample(read_object_folder(out / n)) for n in names]


@pytest.fixture(scope="module")
def test_objects(tmp_path_factory):
    from data_prep.toy_family import indices, toy_names

    out = tmp_path_factory.mktemp("toy")
    train = toy_names(0, indices("train", 0, 2 * TRAIN_OBJECTS)[:TRAIN_OBJECTS])
    return _render(OBJECTS, out), gv.mean_views(_render(train, out))


@pytest.fixture(scope="module")
def pipe():
    from nova3d.pipeline import Nova3DPipeline

    return Nova3DPipeline.from_pretrained(str(TOY_MODEL))


def generate(pipe, true: gv.Views) -> gv.Views:
    out = pipe(true.rgb[0], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), progress=False)
    return gv.Views(out.rgb[0], out.normals[0], out.masks[0])


def scores(pipe, test_objects) -> dict:
    """Means over objects of the generated views' and the baselines' novel-view scores."""
    objects, train_mean = test_objects
    gen, repeated, mean_view = [], [], []
    for true in objects:
        gen.append(gv.score_views(generate(pipe, true), true).means())
        repeated.append(gv.score_views(gv.input_repeated(true), true).means())
        mean_view.append(gv.score_views(train_mean, true).means())
    mean = lambda rows, k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    return {"psnr": mean(gen, "psnr"), "psnr_baseline": mean(mean_view, "psnr"),
            "psnr_input_repeated": mean(repeated, "psnr"), "normal": mean(gen, "normal_error_deg"),
            "normal_baseline": mean(repeated, "normal_error_deg"), "mask_iou": mean(gen, "mask_iou")}


def within_bounds(s: dict) -> bool:
    return (s["psnr"] >= s["psnr_input_repeated"] + PSNR_MARGIN_DB
            and s["normal"] <= s["normal_baseline"] - NORMAL_MARGIN_DEG
            and s["mask_iou"] >= MIN_MASK_IOU)


def test_shipped_toy_model_card_and_files():
    card = (TOY_MODEL / "README.md").read_text()
    for needed in ("make train EXP=toy", "seed", "steps"):
        assert needed in card
    index = json.loads((TOY_MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "Nova3DPipeline" and index["num_frames"] == 16
    size = sum(p.stat().st_size for p in TOY_MODEL.rglob("*") if p.is_file())
    assert size < 20 * 2**20, f"pretrained/toy is {size / 2**20:.1f} MB"


def test_shipped_toy_model_beats_the_trivial_baseline(pipe, test_objects):
    s = scores(pipe, test_objects)
    assert within_bounds(s), s


def _swap_cfg_halves(monkeypatch, pipe):
    """Guidance pushes towards the unconditional prediction: the (uncond, cond) rows swapped."""
    denoise, d = edm.denoise, pipe.num_domains

    def swapped(model_fn, x, sigma, **kw):
        out = denoise(model_fn, x, sigma, **kw)
        return out.unflatten(0, (d, 2, -1)).flip(1).flatten(0, 2) if x.shape[0] % (2 * d) == 0 else out
    monkeypatch.setattr(edm, "denoise", swapped)


def _swap_domains(monkeypatch, pipe):
    """RGB decoded from the normal latents and the other way round."""
    decode, d = pipe.decode, pipe.num_domains
    monkeypatch.setattr(pipe, "decode", lambda latents, *a, **kw: decode(
        latents.unflatten(0, (d, -1)).flip(0).flatten(0, 1), *a, **kw))


def _broken_sampler(monkeypatch, pipe):
    """The Euler step walks the wrong way along the probability-flow ODE."""
    step = edm.euler_step
    monkeypatch.setattr(edm, "euler_step", lambda x, den, s, s_next: step(x, den, s_next, s) if s_next > 0 else den)


@pytest.mark.parametrize("sabotage", [_swap_cfg_halves, _swap_domains, _broken_sampler],
                         ids=["swapped_cfg_halves", "swapped_domains", "broken_sampler"])
def test_the_bounds_catch_a_broken_chain(pipe, test_objects, monkeypatch, sabotage):
    sabotage(monkeypatch, pipe)
    s = scores(pipe, test_objects)
    assert not within_bounds(s), s
