"""Loss curves of runs as one inline SVG: train loss (solid) and held-out loss (dashed, dots)
against tokens seen, one colour per run.

Drawn here in ~100 lines of plain SVG rather than with matplotlib or a JS chart library: the
eval report must be one self-contained file that opens offline, and matplotlib is not a runtime
dependency. Tokens seen (not steps) on the x axis, so runs with different batch sizes or
packing line up.

Not here: reading the metrics (train/metrics.py), the page around the chart (report_page.py).
"""

from __future__ import annotations

import html
import math

__all__ = ["Curve", "curves_from_metrics", "loss_curves_svg", "COLORS"]

COLORS = ("#2f6fdf", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a", "#1098ad", "#e67700", "#495057")
_W, _H = 720, 320                    # the whole drawing, in px
_LEFT, _RIGHT, _TOP, _BOTTOM = 62, 170, 16, 44   # margins: axis labels left/bottom, legend right

Curve = tuple[str, list[tuple[float, float]], list[tuple[float, float]]]  # (run, train points, eval points)


def curves_from_metrics(name: str, records: list[dict]) -> Curve:
    """(name, [(tokens_seen, loss)], [(tokens_seen, eval_loss)]) from metrics.jsonl records."""
    def points(key: str) -> list[tuple[float, float]]:
        return [(float(r["tokens_seen"]), float(r[key])) for r in records
                if isinstance(r.get(key), (int, float)) and isinstance(r.get("tokens_seen"), (int, float))
                and math.isfinite(r[key])]
    return name, points("loss"), points("eval_loss")


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:g}{unit}"
    return f"{value:g}"


def loss_curves_svg(curves: list[Curve]) -> str:
    """The chart as an <svg> element; an empty string when no curve has a point."""
    everything = [p for _, train, held_out in curves for p in (*train, *held_out)]
    if not everything:
        return ""
    x_low, x_high = 0.0, max(x for x, _ in everything) or 1.0
    y_low, y_high = min(y for _, y in everything), max(y for _, y in everything)
    pad = (y_high - y_low) * 0.05 or 0.5
    y_low, y_high = max(0.0, y_low - pad), y_high + pad
    width, height = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def px(x: float, y: float) -> tuple[float, float]:
        return (_LEFT + (x - x_low) / (x_high - x_low) * width, _TOP + (y_high - y) / (y_high - y_low) * height)

    def polyline(points, kind: str, run: str, color: str, dash: str = "") -> str:
        coords = " ".join(f"{px_:.1f},{py_:.1f}" for px_, py_ in (px(x, y) for x, y in points))
        return (f'<polyline class="{kind}" data-run="{run}" fill="none" stroke="{color}" stroke-width="1.6"'
                f'{dash} points="{coords}"/>')

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="loss-curves" viewBox="0 0 {_W} {_H}" '
             f'width="{_W}" height="{_H}" role="img" aria-label="loss against tokens seen" '
             f'font-family="system-ui, sans-serif" font-size="11">']
    for y in _ticks(y_low, y_high):
        if y_low <= y <= y_high:
            y0 = px(x_low, y)[1]
            parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + width}" y1="{y0:.1f}" y2="{y0:.1f}" stroke="#e3e6eb"/>'
                         f'<text x="{_LEFT - 6}" y="{y0 + 4:.1f}" text-anchor="end" fill="#555">{y:g}</text>')
    for x in _ticks(x_low, x_high):
        if x <= x_high:
            parts.append(f'<text x="{px(x, y_low)[0]:.1f}" y="{_TOP + height + 16}" text-anchor="middle" '
                         f'fill="#555">{_label(x)}</text>')
    parts.append(f'<rect x="{_LEFT}" y="{_TOP}" width="{width}" height="{height}" fill="none" stroke="#aab"/>'
                 f'<text x="{_LEFT + width / 2}" y="{_H - 6}" text-anchor="middle" fill="#333">tokens seen</text>'
                 f'<text transform="translate(14 {_TOP + height / 2}) rotate(-90)" text-anchor="middle" '
                 f'fill="#333">loss</text>')
    legend_x, legend_y = _LEFT + width + 12, _TOP + 8

    def legend(color: str, text: str, dash: str = "") -> str:
        return (f'<line x1="{legend_x}" x2="{legend_x + 18}" y1="{legend_y}" y2="{legend_y}" stroke="{color}" '
                f'stroke-width="2"{dash}/><text x="{legend_x + 24}" y="{legend_y + 4}" fill="#222">{text}</text>')

    dashed = ' stroke-dasharray="5 3"'
    for i, (name, train, held_out) in enumerate(curves):
        color, label = COLORS[i % len(COLORS)], html.escape(name)
        if train:
            parts += [polyline(train, "train", label, color), legend(color, f"{label} train")]
            legend_y += 16
        if held_out:
            parts += [polyline(held_out, "eval", label, color, dashed), legend(color, f"{label} eval", dashed)]
            parts += [f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="2.6" fill="{color}"/>'
                      for cx, cy in (px(x, y) for x, y in held_out)]
            legend_y += 16
    parts.append("</svg>")
    return "".join(parts)
