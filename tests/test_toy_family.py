"""The toy recipe's object family (data_prep/toy_family.py) and its data script's rerun contract."""
import numpy as np
import pytest

from data_prep import procedural, toy_family
from data_prep.render_io import collect_sources
from nova3d.errors import Nova3DError


def test_same_seed_and_index_give_the_same_mesh_and_others_differ():
    a, b = toy_family.toy_object(0, 7), toy_family.toy_object(0, 7)
    np.testing.assert_array_equal(a.vertices, b.vertices)
    np.testing.assert_array_equal(a.faces, b.faces)
    np.testing.assert_array_equal(a.visual.vertex_colors, b.visual.vertex_colors)
    others = [toy_family.toy_object(0, 8), toy_family.toy_object(1, 7)]
    for other in others:
        assert other.vertices.shape != a.vertices.shape or not np.allclose(other.vertices, a.vertices)
    # objects do not depend on how many were made before (no shared generator state)
    toy_family.toy_object(0, 3)
    np.testing.assert_array_equal(toy_family.toy_object(0, 7).vertices, a.vertices)


def test_objects_are_composites_of_two_to_four_primitives_with_a_colour_each():
    counts, colours, thin = [], 0, 0
    for i in range(60):
        parts = toy_family.toy_parts(0, i)
        counts.append(len(parts))
        colours += len({tuple(np.round(c, 3)) for _, c in parts}) == len(parts)
        thin += any(min(m.extents) < 0.1 for m, _ in parts)
        mesh = toy_family.toy_object(0, i)
        assert mesh.metadata["part_faces"] and sum(mesh.metadata["part_faces"]) == len(mesh.faces)
    assert set(counts) == {2, 3, 4}
    assert colours == 60  # every part has its own colour
    assert 5 <= thin <= 40  # some objects have a thin part (a rod or a plate), most do not


def test_splits_are_disjoint_cover_every_index_and_are_stable():
    splits = {s: set(toy_family.indices(s, 0, 400)) for s in toy_family.SPLITS}
    assert not (splits["train"] & splits["val"]) and not (splits["train"] & splits["test"])
    assert not (splits["val"] & splits["test"])
    assert set.union(*splits.values()) == set(range(400))
    assert len(splits["test"]) == len(splits["val"]) == 20
    # a larger family keeps the split of every smaller one
    assert set(toy_family.indices("test", 0, 800)) >= splits["test"]
    with pytest.raises(ValueError, match="split"):
        toy_family.indices("holdout", 0, 10)


def test_toy_names_are_procedural_objects_the_renderer_accepts():
    name = toy_family.toy_name(0, 42)
    assert name == "toy-s0-00042" and toy_family.parse_toy_name(name) == (0, 42)
    assert toy_family.parse_toy_name("mug") is None and toy_family.parse_toy_name("toy-s0-x") is None
    np.testing.assert_array_equal(procedural.make_object(name).vertices, toy_family.toy_object(0, 42).vertices)
    assert procedural.solid_object(name).is_watertight
    source = collect_sources([], [name])[0]
    assert source.object_id == name and source.procedural == name
    with pytest.raises(Nova3DError, match="toy-s<seed>-<index>"):
        collect_sources([], ["toy-0-1"])
