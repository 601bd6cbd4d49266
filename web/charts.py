"""Line charts drawn as SVG on the server: pure functions, no I/O.

A chart is a few series of numbers over the same evenly spaced buckets. The
SVG uses presentation attributes only (no inline style), so it works under
the pages' Content-Security-Policy; every label is escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

WIDTH = 420
HEIGHT = 200
LEFT = 44
RIGHT = 10
TOP = 12
BOTTOM = 24
GRID_LINES = 4


@dataclass(frozen=True)
class Series:
    """One line: a name for the legend, a colour, one value per bucket."""

    name: str
    colour: str
    values: Sequence[float]


def nice_ceiling(value: float, steps: int = GRID_LINES) -> float:
    """A round top for the axis: ``steps`` times a round step (1, 1.5, 2, 2.5, ...).

    The result is >= ``value``, so every grid line gets a round label; an empty
    chart gets a top of 1.
    """
    if value <= 0:
        return 1.0
    wanted = value / steps
    exponent = math.floor(math.log10(wanted))
    for multiple in (1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 7.5, 10):
        step = multiple * 10.0**exponent
        if step >= wanted * (1 - 1e-9):
            return step * steps
    return 10.0 ** (exponent + 1) * steps


def format_number(value: float) -> str:
    """Axis labels: ``0``, ``2.5``, ``40``, ``1.2k``, ``3M``."""
    if value >= 1_000_000:
        return f"{value / 1_000_000:.3g}M"
    if value >= 1000:
        return f"{value / 1000:.3g}k"
    if value == int(value):
        return str(int(value))
    return f"{value:.3g}"


def line_chart(
    title: str, unit: str, series: Sequence[Series], x_labels: Sequence[str]
) -> str:
    """An SVG line chart; the x labels are spread evenly under the plot."""
    points = max((len(line.values) for line in series), default=0)
    peak = max((max(line.values, default=0.0) for line in series), default=0.0)
    top_value = nice_ceiling(peak)
    plot_width = WIDTH - LEFT - RIGHT
    plot_height = HEIGHT - TOP - BOTTOM

    def x(index: int) -> float:
        return LEFT + (plot_width * index / max(points - 1, 1))

    def y(value: float) -> float:
        return TOP + plot_height * (1 - min(value, top_value) / top_value)

    label = html.escape(f"{title} ({unit})")
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{label}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{label}</title>",
    ]

    # Horizontal grid lines with their values on the left.
    for step in range(GRID_LINES + 1):
        fraction = step / GRID_LINES
        grid_y = TOP + plot_height * (1 - fraction)
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{grid_y:.1f}" '
            f'y2="{grid_y:.1f}" stroke="#e3e6eb" stroke-width="1"/>'
        )
        parts.append(
            f'<text x="{LEFT - 6}" y="{grid_y + 4:.1f}" text-anchor="end" '
            f'font-size="12" fill="#6b7280">'
            f"{html.escape(format_number(top_value * fraction))}</text>"
        )

    for index, text in enumerate(x_labels):
        label_x = LEFT + plot_width * index / max(len(x_labels) - 1, 1)
        anchor = (
            "start" if index == 0 else "end" if index == len(x_labels) - 1 else "middle"
        )
        parts.append(
            f'<text x="{label_x:.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}" '
            f'font-size="12" fill="#6b7280">{html.escape(text)}</text>'
        )

    for line in series:
        if not line.values:
            continue
        coordinates = " ".join(
            f"{x(index):.1f},{y(value):.1f}" for index, value in enumerate(line.values)
        )
        parts.append(
            f'<polyline points="{coordinates}" fill="none" '
            f'stroke="{html.escape(line.colour)}" stroke-width="1.8" '
            f'stroke-linejoin="round" stroke-linecap="round">'
            f"<title>{html.escape(line.name)}</title></polyline>"
        )

    parts.append("</svg>")
    return "".join(parts)
