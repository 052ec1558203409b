"""Benchmark plots (matplotlib, Agg backend: no display needed): success rate against the initial error, and
the cumulative distribution of the final mTRE per method.

Figures are made with :class:`matplotlib.figure.Figure` on an Agg canvas (no ``pyplot`` state, safe in scripts
and threads) and written atomically: a temporary file in the destination folder, renamed when complete.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._atomic import atomic_path
from ..errors import InputError
from ..metrics import DEFAULT_THRESHOLDS_MM, CaseResult, Summary

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_error_cdf", "plot_success_vs_initial_error"]

#: Smallest mTRE drawn on a log axis (mm); smaller values (an exact registration) are drawn at this value.
MIN_LOG_MM = 1e-3
_DPI = 120


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".") or "png"
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise InputError(
            f"{path}: unsupported plot format {fmt!r}; expected one of {', '.join(sorted(supported))}"
        )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=_DPI)
    return path


def _methods_in_order(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def plot_success_vs_initial_error(
    summary_rows: Iterable[Summary], path: str | Path, *, thresholds: Sequence[float] | None = None
) -> Path:
    """Success rate (mTRE below a threshold) against the perturbation level of the initial pose, per method.

    One panel per mTRE threshold, one line per method; the x axis lists the perturbation levels in the order
    of their first appearance (their label, e.g. ``"5°/10 mm"``, and the median initial mTRE of the level).

    Args:
        summary_rows: :class:`~xraypose.metrics.Summary` records of one method and one level each, e.g. the
            values of ``summarize_by(results, ("method", "level"))``; rows whose level is ``"mixed"`` (several
            levels pooled) are left out.
        path: output image (PNG unless the suffix names another matplotlib format).
        thresholds: mTRE thresholds (mm) to draw, one panel each; default those of the first summary.
    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    rows = [s for s in summary_rows if isinstance(s, Summary) and s.level != "mixed"]
    if not rows:
        raise InputError(
            "plot_success_vs_initial_error: expected Summary records of one method and level each"
        )
    taus = [float(t) for t in (thresholds if thresholds is not None else rows[0].success)]
    if not taus:
        raise InputError("plot_success_vs_initial_error: no thresholds to plot")
    levels = _methods_in_order(s.level for s in rows)
    methods = _methods_in_order(s.method for s in rows)

    initial: dict[str, list[float]] = {}
    for s in rows:
        if s.initial_mtre_mm is not None and math.isfinite(s.initial_mtre_mm.median):
            initial.setdefault(s.level, []).append(s.initial_mtre_mm.median)
    ticks = [
        f"{lv or '—'}\n({float(np.median(initial[lv])):.1f} mm)" if lv in initial else (lv or "—")
        for lv in levels
    ]

    fig = _new_figure(3.2 * len(taus) + 0.8, 3.8)
    axes = fig.subplots(1, len(taus), sharey=True, squeeze=False)[0]
    x = np.arange(len(levels))
    for ax, tau in zip(axes, taus, strict=True):
        for method in methods:
            ys = []
            for lv in levels:
                found = [s for s in rows if s.method == method and s.level == lv]
                rate = found[0].success.get(tau) if found else None
                ys.append(math.nan if rate is None else 100.0 * rate.fraction)
            ax.plot(x, ys, marker="o", label=method)
        ax.set_title(f"SR@{tau:g} mm (mTRE < {tau:g} mm)", fontsize=10)
        ax.set_xticks(x, ticks, fontsize=7)
        ax.set_ylim(-3, 103)
        ax.set_xlim(-0.3, len(levels) - 0.7)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("initial perturbation (rot/trans; median initial mTRE)", fontsize=8)
    axes[0].set_ylabel("success rate (%)")
    axes[-1].legend(fontsize=8, loc="best")
    fig.suptitle("Registration success rate against initial error")
    return _save(fig, path)


def plot_error_cdf(
    results: Iterable[CaseResult],
    path: str | Path,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS_MM,
    show_initial: bool = True,
) -> Path:
    """Cumulative distribution of the final mTRE per method (log x axis), with the success thresholds marked.

    The y value at ``x`` is the percentage of a method's runs with ``mTRE ≤ x``, over **all** its runs: runs
    with a non-finite mTRE (diverged) never count, so a curve tops out below 100 % when some fail. mTREs below
    :data:`MIN_LOG_MM` are drawn at that value. With ``show_initial`` (and initial mTREs recorded) the
    distribution of the initial mTRE of the first method's runs is drawn dashed, for reference.

    Args:
        results: per-run :class:`~xraypose.metrics.CaseResult` records of one or more methods.
        path: output image (PNG unless the suffix names another matplotlib format).
        thresholds: mTRE thresholds (mm) drawn as vertical lines.
    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    records = [r for r in results if isinstance(r, CaseResult)]
    if not records:
        raise InputError("plot_error_cdf: expected at least one CaseResult")
    methods = _methods_in_order(r.method for r in records)

    def curve(values: list[float]) -> tuple[np.ndarray, np.ndarray]:
        v = np.asarray(values, dtype=np.float64)
        finite = np.sort(np.maximum(v[np.isfinite(v)], MIN_LOG_MM))
        y = 100.0 * np.arange(1, finite.size + 1) / max(v.size, 1)
        # start the step at 0 % just left of the smallest value
        return np.concatenate([finite[:1], finite]), np.concatenate([[0.0], y])

    fig = _new_figure(6.4, 4.2)
    ax = fig.add_subplot()
    lo, hi = math.inf, -math.inf
    for method in methods:
        xs, ys = curve([r.mtre_mm for r in records if r.method == method])
        if xs.size:
            lo, hi = min(lo, float(xs[0])), max(hi, float(xs[-1]))
            ax.step(xs, ys, where="post", label=method)
    first = [r.initial_mtre_mm for r in records if r.method == methods[0]]
    if show_initial and first and all(v is not None for v in first):
        xs, ys = curve([float(v) for v in first])  # type: ignore[arg-type]
        if xs.size:
            lo, hi = min(lo, float(xs[0])), max(hi, float(xs[-1]))
            ax.step(xs, ys, where="post", color="grey", linestyle="--", label="initial pose")
    for tau in thresholds:
        ax.axvline(float(tau), color="black", linewidth=0.6, linestyle=":", alpha=0.6)
    if math.isfinite(lo):
        ax.set_xlim(min(lo, min(thresholds, default=lo)) / 1.5, max(hi, max(thresholds, default=hi)) * 1.5)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.set_ylim(0, 101)
    ax.set_xlabel("final mTRE (mm, log scale)")
    ax.set_ylabel("runs with mTRE ≤ x (%)")
    ax.set_title("Cumulative distribution of the final mTRE\n(dotted: success thresholds)", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)
