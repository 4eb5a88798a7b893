"""Score histograms per class, drawn by matplotlib (its Agg canvas, no display) as PNGs for the page."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

from totask_ray.preview.draw import colour_of


def score_histogram(
    label: str,
    kept: Sequence[float],
    classes: Sequence[str],
    below: Sequence[float] = (),
    threshold: float | None = None,
) -> bytes:
    """A PNG: the scores of `label`'s objects that would be written, and (`below`) those the
    confidence threshold dropped, with the threshold marked."""
    # A Figure on an Agg canvas, not pyplot: no global backend switched (a notebook's inline plots
    # keep working), nothing displayed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.4, 2.0), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bins = [i / 20 for i in range(21)]
    colour = tuple(c / 255 for c in colour_of(label, classes))
    if below:
        ax.hist(list(below), bins=bins, color="0.7", label="dropped (below threshold)")
    ax.hist(list(kept), bins=bins, color=colour, edgecolor="0.2", linewidth=0.4, label="written")
    if threshold:
        ax.axvline(threshold, color="0.2", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_title(f"{label}: {len(kept)} scores", fontsize=9)
    ax.set_xlabel("score", fontsize=8)
    ax.tick_params(labelsize=7)
    if below:
        ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def histograms(
    scores: Mapping[str, Sequence[float]],
    classes: Sequence[str],
    below: Mapping[str, Sequence[float]] | None = None,
    threshold: float | None = None,
) -> dict[str, bytes]:
    """One PNG per class that has a score (kept or dropped), by class name."""
    below = below or {}
    names = [c for c in classes if c in scores or c in below]
    names += sorted(n for n in {*scores, *below} if n not in names)
    return {n: score_histogram(n, scores.get(n, ()), classes, below.get(n, ()), threshold) for n in names}
