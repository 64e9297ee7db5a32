"""Line charts drawn with PIL (matplotlib is not a dependency): panels side by side, each with
axes, ticks, a title and a legend, one curve per series. Used by nova3d.eval.pose_study."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from nova3d.viz import save_png_atomic

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))  # tab10's first five


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)  # label -> (xs, ys)
    xticks: list[float] | None = None  # None: nice ticks over the data


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round numbers (1, 2, 2.5 or 5 x 10^k apart) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks, t = [], start
    while t < hi + step * 0.999:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _label(x: float) -> str:
    return f"{x:.4g}"


def _draw_panel(draw: ImageDraw.ImageDraw, panel: Panel, x0: int, y0: int, w: int, h: int) -> None:
    left, right, top, bottom = x0 + 58, x0 + w - 12, y0 + 40, y0 + h - 58
    points = [(x, y) for xs, ys in panel.series.values() for x, y in zip(xs, ys)
              if y is not None and math.isfinite(y)]
    xs_all = [p[0] for p in points] or [0.0, 1.0]
    ys_all = [p[1] for p in points] or [0.0, 1.0]
    xt = panel.xticks or nice_ticks(min(xs_all), max(xs_all))
    yt = nice_ticks(min(ys_all), max(ys_all))
    xlo, xhi = min(xt[0], min(xs_all)), max(xt[-1], max(xs_all))
    ylo, yhi = yt[0], yt[-1]
    xhi, yhi = (xhi if xhi > xlo else xlo + 1), (yhi if yhi > ylo else ylo + 1)
    px = lambda x: left + (x - xlo) / (xhi - xlo) * (right - left)  # noqa: E731
    py = lambda y: bottom - (y - ylo) / (yhi - ylo) * (bottom - top)  # noqa: E731
    draw.text((x0 + w // 2 - 3 * len(panel.title), y0 + 4), panel.title, fill="black")
    for t in yt:  # grid lines, then the axes over them
        draw.line([(left, py(t)), (right, py(t))], fill=(225, 225, 225))
        draw.text((left - 8 - 6 * len(_label(t)), py(t) - 6), _label(t), fill="black")
    for t in xt:
        draw.line([(px(t), bottom), (px(t), bottom + 4)], fill="black")
        draw.text((px(t) - 3 * len(_label(t)), bottom + 6), _label(t), fill="black")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    draw.text(((left + right) // 2 - 3 * len(panel.xlabel), bottom + 20), panel.xlabel, fill="black")
    draw.text((x0 + 4, top - 18), panel.ylabel, fill="black")
    lx = left  # the legend: one row under the x label, series side by side
    for k, (name, (xs, ys)) in enumerate(panel.series.items()):
        colour = COLOURS[k % len(COLOURS)]
        pts = [(px(x), py(y)) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.rectangle([lx, bottom + 41, lx + 12, bottom + 47], fill=colour)
        draw.text((lx + 16, bottom + 38), name, fill="black")
        lx += 16 + 6 * len(name) + 18


def line_panels(panels: list[Panel], title: str, out_path: str | os.PathLike,
                panel_size: tuple[int, int] = (360, 300)) -> Path:
    """One PNG: `panels` side by side under `title`, written atomically; returns its path."""
    w, h = panel_size
    image = Image.new("RGB", (w * len(panels), h + 28), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black")
    for k, panel in enumerate(panels):
        _draw_panel(draw, panel, k * w, 28, w, h)
    return save_png_atomic(image, out_path)
