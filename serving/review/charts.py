"""Server-rendered explanation chart: a waterfall of SHAP contributions as plain geometry for an inline SVG.

The model's raw output (log-odds) is ``base_value + sum(contributions)``. The chart starts at the base value
(the model's average output), moves by each top reason (right = raises risk, left = lowers risk), lumps the
remaining features into one "other factors" step and ends at the raw output, so the bars add up exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

WIDTH = 820
LABEL_W = 330  # left column: factor label and value
RIGHT_PAD = 70  # room for the contribution text right of the plot
ROW_H = 30
TOP = 34  # room for the axis title
BOTTOM = 36  # room for the tick labels


@dataclass
class Step:
    """One row of the waterfall (pixel coordinates already computed)."""

    kind: str  # "base" | "up" | "down" | "other" | "total"
    label: str
    value: str  # the feature value as shown ("" for base/other/total)
    amount: float  # signed contribution (base/total: the position itself)
    start: float
    end: float
    y: float = 0.0
    x: float = 0.0
    w: float = 0.0
    text_x: float = 0.0
    text: str = ""


@dataclass
class Waterfall:
    steps: list[Step]
    width: int
    height: int
    plot_left: float
    plot_right: float
    ticks: list[tuple[float, str]] = field(default_factory=list)
    base_x: float = 0.0
    final_x: float = 0.0
    axis_y: float = 0.0


def format_value(value) -> str:
    """A feature value for people: integers without decimals, others with 3 significant digits."""
    if value is None:
        return "missing"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        v = float(value)
        if not math.isfinite(v):
            return "missing"
        if v.is_integer() and abs(v) < 1e15:
            return f"{int(v):,}"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}"
    return str(value)


def signed(x: float) -> str:
    return f"{'+' if x >= 0 else '−'}{abs(x):.2f}"


def _nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    span = max(hi - lo, 1e-9)
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    out, t = [], first
    while t <= hi + 1e-9:
        out.append(round(t, 10) + 0.0)
        t += step
    return out


def waterfall(base_value: float, reasons: list[dict], raw_margin: float, n_features: int | None = None,
              labels: dict[str, str] | None = None) -> Waterfall:
    """Geometry of the waterfall for one explanation (``reasons`` as stored: feature, label, value, contribution)."""
    labels = labels or {}
    steps = [Step("base", "Starting point: the model's average item", "", base_value, base_value, base_value)]
    pos = base_value
    for r in reasons:
        c = float(r["contribution"])
        label = r.get("label") or labels.get(r["feature"], r["feature"])
        steps.append(Step("up" if c > 0 else "down", label, format_value(r.get("value")), c, pos, pos + c))
        pos += c
    rest = raw_margin - pos
    if abs(rest) > 1e-9:
        others = f"{n_features - len(reasons)} " if n_features is not None and n_features > len(reasons) else ""
        steps.append(Step("other", f"All {others}other factors together", "", rest, pos, raw_margin))
        pos = raw_margin
    steps.append(Step("total", "Model output for this item", "", raw_margin, raw_margin, raw_margin))

    points = [p for s in steps for p in (s.start, s.end)]
    lo, hi = min(points), max(points)
    pad = max((hi - lo) * 0.08, 0.25)
    lo, hi = lo - pad, hi + pad
    left, right = float(LABEL_W), float(WIDTH - RIGHT_PAD)

    def px(v: float) -> float:
        return round(left + (v - lo) / (hi - lo) * (right - left), 2)

    for i, s in enumerate(steps):
        s.y = TOP + i * ROW_H
        a, b = px(min(s.start, s.end)), px(max(s.start, s.end))
        s.x, s.w = a, max(b - a, 2.0)
        if s.kind in ("base", "total"):
            s.text = f"{s.amount:.2f}"
            s.text_x = px(s.amount) + 8
        else:
            s.text = signed(s.amount)
            s.text_x = s.x + s.w + 6
    height = TOP + len(steps) * ROW_H + BOTTOM
    chart = Waterfall(steps=steps, width=WIDTH, height=height, plot_left=left, plot_right=right,
                      base_x=px(base_value), final_x=px(raw_margin), axis_y=TOP + len(steps) * ROW_H + 4)
    chart.ticks = [(px(t), f"{t:g}") for t in _nice_ticks(lo, hi)]
    return chart
