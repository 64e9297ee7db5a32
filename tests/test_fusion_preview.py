"""Pictures of a fusion result (nova3d.fusion.preview): colormap, turntable GIF, conflict sheet."""
import numpy as np
import pytest
import torch
from PIL import Image

from nova3d.errors import Nova3DError
from nova3d.fusion.mesh import clean_mesh, color_vertices, extract_mesh
from nova3d.fusion.preview import (VIRIDIS, colormap, conflict_sheet, render_turntable, sheet_tile_origin,
                                   turntable)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def mesh():
    """A red sphere with a green bump on +X: the silhouette and colours change as it turns."""
    bump = torch.tensor([0.3, 0.0, 0.0])
    sdf = lambda p: torch.minimum(p.norm(dim=-1) - 0.3, (p - bump).norm(dim=-1) - 0.12)
    m = clean_mesh(extract_mesh(sdf, 0.75, 32, progress=False))
    return color_vertices(m, lambda p, n: torch.stack([(p[:, 0] < 0.25).float(), (p[:, 0] >= 0.25).float(),
                                                       torch.zeros(len(p))], -1), progress=False)


def test_colormap_ends_and_types():
    c = colormap(torch.tensor([[0.0, 1.0], [float("nan"), 2.0]]))
    assert c.shape == (2, 2, 3) and isinstance(c, torch.Tensor)
    assert torch.allclose(c[0, 0], torch.tensor([0.267004, 0.004874, 0.329415]))  # viridis(0)
    assert torch.allclose(c[0, 1], torch.tensor([0.993248, 0.906157, 0.143936]))  # viridis(1)
    assert torch.equal(c[1, 0], c[0, 0]) and torch.equal(c[1, 1], c[0, 1])  # NaN -> 0, clamped
    assert np.allclose(colormap(np.array([0.5])), VIRIDIS[128])
    lum = VIRIDIS @ np.array([0.2126, 0.7152, 0.0722])
    assert (np.diff(lum) > 0).all()  # perceptually ordered: brightness grows with the value


def test_turntable_gif(tmp_path, mesh):
    path = turntable(mesh, tmp_path / "tt.gif", frames=6, image_size=48, progress=False)
    assert path.is_file() and not list(tmp_path.glob("*.tmp"))
    with Image.open(path) as gif:
        assert gif.n_frames == 6 and gif.size == (48, 48)
        frames = []
        for k in range(gif.n_frames):
            gif.seek(k)
            frames.append(np.asarray(gif.convert("RGB")).astype(int))
    for f in frames:
        covered = (f < 250).any(-1).mean()
        assert 0.05 < covered < 0.9  # not blank, not all object
    assert np.abs(frames[0] - frames[2]).mean() > 1  # it turns: the bump moves
    # Frame 0 looks at the front (-Y): +X (the green bump) is on the right of the image.
    f0 = frames[0]
    green = (f0[..., 1] > f0[..., 0] + 30)
    assert green.any() and np.nonzero(green)[1].mean() > 24


def test_unlit_turntable_keeps_colours(mesh):
    video = render_turntable(mesh, frames=2, image_size=32, shading="unlit", progress=False)
    assert video.shape == (2, 32, 32, 3) and video.dtype == np.uint8
    colours = {tuple(c) for c in video.reshape(-1, 3)}
    assert (255, 0, 0) in colours and (255, 255, 255) in colours


def test_turntable_bad_suffix(tmp_path, mesh):
    with pytest.raises(Nova3DError, match="gif or .mp4"):
        turntable(mesh, tmp_path / "tt.avi", frames=2, image_size=16, progress=False)


def test_conflict_sheet(tmp_path):
    V, tile = 3, 40
    rgb = torch.rand(V, 3, 24, 24)
    conflict = torch.zeros(V, 16, 16)
    conflict[1] = 1.0
    conflict[2, :, 8:] = 1.0
    truth = conflict > 0.5
    path = conflict_sheet(rgb, conflict, tmp_path / "sheet.png", truth=truth, tile=tile)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[0] == 3 * (tile + 14) and image.shape[1] >= V * tile
    lo, hi = (np.round(VIRIDIS[[0, 255]] * 255)).astype(int)
    x, y = sheet_tile_origin(1, 0, tile)
    assert (np.abs(image[y:y + tile, x:x + tile] - lo) <= 1).all()
    x, y = sheet_tile_origin(1, 1, tile)
    assert (np.abs(image[y:y + tile, x:x + tile] - hi) <= 1).all()
    x, y = sheet_tile_origin(1, 2, tile)  # left half trusted, right half conflicting
    assert (np.abs(image[y + 5, x + 5] - lo) <= 1).all() and (np.abs(image[y + 5, x + tile - 5] - hi) <= 1).all()
    x, y = sheet_tile_origin(2, 2, tile)  # true corruption row: white where corrupted
    assert (image[y + 5, x + 5] == 0).all() and (image[y + 5, x + tile - 5] == 255).all()
    with pytest.raises(Nova3DError, match="conflict maps"):
        conflict_sheet(rgb, conflict[:2], tmp_path / "bad.png")


def test_error_sheet_shows_the_error_where_it_is(tmp_path):
    """Views vs renders: the error row is viridis(0) where they agree and viridis(err / max) where not."""
    from nova3d.fusion.error_sheet import error_sheet, error_tile_origin

    true = torch.full((3, 3, 16, 16), 0.5)
    rendered = true.clone()
    rendered[1, :, 8:, :] += 0.25  # view 1, lower half: error 0.25 = half of max_error 0.5
    path = error_sheet(true, rendered, tmp_path / "errors.png", tile=32, max_error=0.5)
    sheet = np.asarray(Image.open(path).convert("RGB")).astype(int)
    viridis = (np.asarray(VIRIDIS) * 255 + 0.5).astype(int)
    for view, (top, bottom) in {0: (0, 0), 1: (0, 128), 2: (0, 0)}.items():
        x, y = error_tile_origin(2, view, tile=32)
        assert np.abs(sheet[y + 4, x + 16] - viridis[top]).max() <= 1, view
        assert np.abs(sheet[y + 28, x + 16] - viridis[bottom]).max() <= 1, view
    x, y = error_tile_origin(1, 1, tile=32)  # the render row shows the render
    assert np.abs(sheet[y + 28, x + 16] - 191).max() <= 1
    with pytest.raises(Nova3DError, match="bad.png"):
        error_sheet(true, rendered[:2], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
