"""The sweep's picture: measured speedup against held-out fidelity (or the task metric), front marked.

convfactor's points are circles labelled with their target, the Pareto front joined by a line; the
uniform weight-only baseline's points are grey squares labelled with their rank fraction; int8 points
(``sweep(quantize="int8")``) are orange triangles, the original in int8 a black diamond. The x axis is
the task metric when one was given, else the held-out relative error (worst slice). matplotlib (the
``plot`` extra) is imported here only, with the non-interactive Agg backend.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConvfactorError
from .result import SweepResult

__all__ = ["plot_sweep"]


def plot_sweep(result: SweepResult, path: str | Path, title: str | None = None) -> Path:
    """Draw ``result`` into the PNG ``path`` (written as given: callers stage it for an atomic publish).

    Raises:
        ConvfactorError: matplotlib is not installed, or no point was timed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConvfactorError("the sweep's plot needs matplotlib: pip install 'convfactor[plot]'") from None
    timed = [p for p in result.points if p.speedup is not None]
    if not timed:
        raise ConvfactorError("nothing to plot: no point was timed")
    by_metric = result.metric_name is not None and all(p.metric is not None for p in timed)

    def x_of(point):
        return point.metric if by_metric else point.rel_error

    figure, axes = plt.subplots(figsize=(7.5, 5))
    ours = [p for p in timed if p.convfactor and p.quantized is None]
    ours_int8 = [p for p in timed if p.convfactor and p.quantized is not None]
    originals = [p for p in timed if p.kind == "original"]
    base = [p for p in timed if p.baseline]
    front = [result.points[i] for i in result.front if result.points[i].speedup is not None]
    if base:
        axes.scatter([x_of(p) for p in base], [p.speedup for p in base], marker="s", color="0.55",
                     label=f"uniform {base[0].label.split()[1]} (weights only)", zorder=2)
        for p in base:
            axes.annotate(p.label.split(" ", 2)[-1], (x_of(p), p.speedup), textcoords="offset points",
                          xytext=(5, -10), fontsize=7, color="0.4")
    axes.scatter([x_of(p) for p in ours], [p.speedup for p in ours], color="tab:blue", label="convfactor auto",
                 zorder=3)
    if ours_int8:
        axes.scatter([x_of(p) for p in ours_int8], [p.speedup for p in ours_int8], marker="^", color="tab:orange",
                     label="convfactor auto, int8", zorder=3)
    for p in originals:
        axes.scatter([x_of(p)], [p.speedup], marker="D", color="black", label=p.label, zorder=3)
        axes.annotate(p.label, (x_of(p), p.speedup), textcoords="offset points", xytext=(5, -10), fontsize=8)
    if front:
        ordered = sorted(front, key=x_of)
        axes.plot([x_of(p) for p in ordered], [p.speedup for p in ordered], color="tab:blue", linewidth=1,
                  zorder=2, label="Pareto front")
        axes.scatter([x_of(p) for p in front], [p.speedup for p in front], facecolors="none",
                     edgecolors="tab:red", s=140, zorder=4, label="on the front")
    for p in ours + ours_int8:
        axes.annotate(p.label, (x_of(p), p.speedup), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axes.axhline(1.0, color="0.8", linewidth=0.8, zorder=1)
    if by_metric:
        better = "higher" if result.higher_is_better else "lower"
        axes.set_xlabel(f"task metric {result.metric_name} ({better} is better; original "
                        f"{result.metric_original:.4g})")
    else:
        axes.set_xlabel(f"held-out relative error, worst output slice ({result.data})")
    bench = result.bench or {}
    axes.set_ylabel(f"measured speedup over the original (onnxruntime, {bench.get('threads', '?')} thread(s))")
    axes.set_title(title or "convfactor sweep: speed against fidelity")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png", dpi=120)
    plt.close(figure)
    return path
