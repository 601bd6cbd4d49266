"""Server-drawn SVG charts."""

from __future__ import annotations

from web.charts import Series, format_number, line_chart, nice_ceiling


def test_nice_ceiling_gives_round_grid_lines() -> None:
    """The axis top is four round steps at or above the peak."""
    assert nice_ceiling(0) == 1
    assert nice_ceiling(37) == 40
    assert nice_ceiling(42) == 50
    assert nice_ceiling(0.3) == 0.3
    assert nice_ceiling(9000) == 10000


def test_format_number_is_short() -> None:
    """Axis labels stay short."""
    assert [format_number(v) for v in (0, 2.5, 40, 1200, 3_000_000)] == [
        "0",
        "2.5",
        "40",
        "1.2k",
        "3M",
    ]


def test_chart_escapes_labels_and_draws_each_series() -> None:
    """Titles are escaped and every series becomes one polyline."""
    svg = line_chart(
        "<b>rates</b>",
        "events/s",
        [
            Series("stored", "#2563eb", [0, 1, 2]),
            Series("delivered", "#16a34a", [0, 1, 1]),
        ],
        ["60 min ago", "now"],
    )
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "<b>" not in svg and "&lt;b&gt;rates&lt;/b&gt;" in svg
    assert svg.count("<polyline") == 2
    assert "style=" not in svg  # drawn under the pages' CSP
