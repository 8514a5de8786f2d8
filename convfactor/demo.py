"""``convfactor demo``: the whole pipeline on a shipped, trained model, in a few minutes at most.

    inspect -> factorize under MAC budgets (automatic allocation, calibrated on training images)
            -> ONNX export -> held-out accuracy in onnxruntime -> latency of all models together -> summary

Sized to finish within 3 minutes of wall time on two shared CPU cores (a CI runner): two budgets, 64 calibration
images, ``method: auto`` choosing among four methods on a 10-rank grid (``demo_options``), PyTorch on
one thread (on an oversubscribed machine a second thread spins more than it computes) and the
TorchScript ONNX exporter (dynamo's costs 5-9 CPU-s per model here). The latency
table times the original and every factorized model in the same rotating rounds, so all rows share one
original latency and each speedup is the original's latency over the row's.

The default model is a ResNet-20 trained on scikit-learn's bundled digits (upscaled to 32x32), shipped
in ``convfactor/data``; nothing is downloaded. Files land in ``--out-dir``: the ONNX models, the
report (JSON) and, with matplotlib installed, ``demo.png`` (accuracy vs latency per budget, and the
singular-value spectra of the heaviest layers).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConvfactorError
from .tables import format_grid

__all__ = ["run_demo", "DEFAULT_BUDGETS", "demo_policy", "demo_options", "heaviest_layers"]

DEFAULT_MODEL = "resnet20_digits"
DEFAULT_BUDGETS = (0.5, 0.25)
CALIBRATION_SAMPLES = 64
# The automatic policy's work, cut to what a demo needs (measured on resnet20_digits, 1 thread: 12-14
# CPU-s per budget, against 180 with the defaults, at the same held-out accuracy): grouped decompositions
# and VBMF estimates cost most of it and this network's allocation never picked them.
DEMO_FRACTIONS = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 1.0)
DEMO_METHODS = ("spatial_svd", "tucker2", "svd", "depthwise")
# Ranks rounded up to multiples of 8 keep onnxruntime on its blocked fast path (measured: an unaligned
# allocation at 0.5 MACs ran 1.03x, an aligned one 1.84x, at the same accuracy).
ALIGN = 8


def demo_policy(budget: float, method: str = "auto") -> dict[str, Any]:
    """Every Conv2d may be factorized (method chosen per layer, or fixed), ranks aligned to 8; MACs <= ``budget``.
    The output is declared as class scores, so the held-out check measures top-1 agreement on it."""
    return {"rules": [{"types": ["Conv2d"], "method": method, "align": ALIGN}], "target": {"macs": budget},
            "fidelity": {"outputs": {0: {"kind": "scores"}}}}


def demo_options():
    """The ``AutoOptions`` of the demo: a 10-fraction rank grid, four methods, no VBMF estimates."""
    from .auto import AutoOptions

    return AutoOptions(fractions=DEMO_FRACTIONS, auto_methods=DEMO_METHODS, vbmf=False,
                       sensitivity_samples=CALIBRATION_SAMPLES)


def heaviest_layers(macs: dict[str, int], count: int = 5) -> list[str]:
    """The ``count`` layers with the most MACs, ties broken by the order of ``macs`` (the model's order)."""
    order = {name: index for index, name in enumerate(macs)}
    return sorted(macs, key=lambda name: (-macs[name], order[name]))[:count]


def _accuracy_onnx(path: Path, x: torch.Tensor, y: torch.Tensor) -> tuple[float, np.ndarray]:
    from .runtime.sessions import make_session

    session = make_session(path, threads=None)
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    predictions = logits.argmax(axis=1)
    return float((predictions == y.numpy()).mean()), predictions


def _plot(path: Path, rows: list[dict[str, Any]], spectra: dict[str, np.ndarray], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, row in enumerate(rows):
        marker = "s" if row["budget"] is None else "o"
        left.scatter(row["latency_ms"], 100 * row["accuracy"], marker=marker, s=60)
        label = "original" if row["budget"] is None else f"MACs x{row['macs_ratio']:.2f}"
        left.annotate(label, (row["latency_ms"], 100 * row["accuracy"]), textcoords="offset points",
                      xytext=(6, 4 if index % 2 == 0 else -14))  # alternate sides: close points stay legible
    left.set_xlabel("onnxruntime latency, median ms (batch 1)")
    left.set_ylabel("held-out accuracy (%)")
    left.set_title(f"{title}: accuracy vs measured latency")
    left.margins(0.2)
    left.grid(alpha=0.3)
    for name, s in spectra.items():
        right.semilogy(np.arange(1, len(s) + 1) / len(s), s / s[0], label=name)
    right.set_xlabel("rank / full rank (spatial SVD)")
    right.set_ylabel("singular value / largest")
    right.set_title("singular-value spectra of the heaviest layers")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    from .files.atomic import atomic_write

    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110), force=True)
    plt.close(fig)
    return True


def run_demo(
    model_name: str = DEFAULT_MODEL,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    out_dir: str | Path = "convfactor-demo",
    *,
    method: str = "auto",
    threads: int = 1,
    min_time: float = 1.0,
    plot: bool = True,
    force: bool = False,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo pipeline and return its report (also written to ``out_dir/report.json``).

    Args:
        model_name: a shipped checkpoint (``convfactor.zoo.PRETRAINED``).
        budgets: MAC targets as fractions of the original.
        out_dir: where ONNX files, report.json and demo.png go (created; existing files need ``force``).
        method: ``"auto"`` (method chosen per layer) or one method name for every conv.
        threads: onnxruntime intra-op threads for the latency comparison.
        min_time: seconds of timing, all models together (longer when the machine is too noisy).
        plot: write demo.png when matplotlib is installed.
        force: overwrite files of an earlier run in ``out_dir``.
        progress: show progress bars (the CLI passes True only when stderr is a terminal); each phase
            also prints one line with its time through ``say``.
        say: where progress lines and the summary are printed.
    """
    from .zoo import PRETRAINED

    if not budgets or any(not 0 < b < 1 for b in budgets):
        raise ConvfactorError(f"budgets must be fractions in (0, 1), got {list(budgets)}")
    if model_name not in PRETRAINED:
        raise ConvfactorError(f"unknown demo model {model_name!r}; available: {', '.join(PRETRAINED)}")
    out = Path(out_dir)
    names = ["original.onnx", "report.json", "demo.png"] + [f"factorized-macs{b:g}.onnx" for b in budgets]
    existing = [n for n in names if (out / n).exists()]
    if existing and not force:
        raise ConvfactorError(f"{out / existing[0]} exists (from an earlier demo run); pass --force to overwrite "
                              f"or choose another --out-dir")
    if out.exists() and not out.is_dir():
        raise ConvfactorError(f"--out-dir {out} exists and is not a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: more threads only spin on a busy machine (see module doc)
    work = Path(tempfile.mkdtemp(dir=out, prefix=".convfactor-demo-"))  # staged here, published as one set
    try:
        document = _run(model_name, budgets, out, work, method, threads, min_time, plot, progress, say)
        _publish(work, out, force)
        return document
    finally:
        torch.set_num_threads(threads_before)
        shutil.rmtree(work, ignore_errors=True)
        if created and not any(out.iterdir()):  # an interrupted first run leaves no empty directory either
            out.rmdir()


def _publish(work: Path, out: Path, force: bool) -> None:
    """Move every file the demo wrote in ``work`` to ``out`` together, report.json last; or none of them.

    An interrupted or failed demo then leaves no ``original.onnx`` behind that would make the rerun refuse
    without ``--force`` (``convfactor.files.atomic.StagedOutputs``, as ``convert`` publishes its outputs).
    """
    from .files.atomic import StagedOutputs

    names = sorted((p.name for p in work.iterdir() if p.is_file()), key=lambda n: (n == "report.json", n))
    with StagedOutputs(force) as staged:
        for name in names:
            staged.write(out / name, lambda path, source=work / name: os.replace(source, path))
        staged.commit()


def _export(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """ONNX export with the TorchScript exporter (0.2 CPU-s here against 5-9 for dynamo), dynamo if it fails."""
    from . import export_onnx
    from .errors import ExportError

    try:
        export_onnx(model, example, path, force=True, exporter="torchscript")
    except ExportError:
        export_onnx(model, example, path, force=True)


def _run(model_name: str, budgets: Sequence[float], out: Path, work: Path, method: str, threads: int, min_time: float,
         plot: bool, progress: bool, say: Callable[[str], None]) -> dict[str, Any]:
    from . import factorize, get_report
    from .auto.search.verify import ConvfactorWarning
    from .report import warning_line
    from .runtime.shared_timing import time_together
    from .score import challenge_score
    from .zoo import load_pretrained
    from .zoo.digits import calibration_subset, load_digits_split

    started = time.perf_counter()

    def elapsed() -> str:
        return f"{time.perf_counter() - started:.0f} s"

    torch.manual_seed(0)
    model, meta = load_pretrained(model_name)
    x_test, y_test = load_digits_split("test")
    x_calib, _ = calibration_subset(CALIBRATION_SAMPLES)
    example = x_test[:1]
    say(f"[1/5] {model_name}: {meta['model']} trained on scikit-learn digits (32x32), "
        f"held-out accuracy {100 * meta['heldout_accuracy']:.1f}% on {len(y_test)} images")

    # 1. inspect: where the MACs are, and how compressible each heavy layer is.
    from .costs import per_layer_macs
    from .methods import get_method
    from .ranks import fraction_to_rank, kept_energy

    macs = per_layer_macs(model, (example,))
    total = sum(macs.values())
    heavy = heaviest_layers(macs)
    svd = get_method("spatial_svd")
    spectra = {}
    for name in heavy:
        layer = model.get_submodule(name)
        if svd.unsupported_reason(layer) is None:
            spectra[name] = svd.spectra(layer)[0]
    lines = []
    for name in heavy:
        line = f"      {name:<22} {100 * macs[name] / total:5.1f}% of MACs"
        if name in spectra:
            kept = kept_energy(spectra[name], fraction_to_rank(0.25, len(spectra[name])))
            line += f", spatial SVD keeps {100 * kept:.0f}% of the energy at 1/4 rank"
        lines.append(line)
    say("      heaviest layers (most MACs first; equal MACs in the model's order):\n" + "\n".join(lines))

    # 2. the original, exported and checked once.
    original_onnx = work / "original.onnx"  # files are written in ``work``; the document names them in ``out``
    _export(model, example, original_onnx)
    accuracy, original_predictions = _accuracy_onnx(original_onnx, x_test, y_test)
    params_before = sum(p.numel() for p in model.parameters())
    rows: list[dict[str, Any]] = [{
        "budget": None, "macs": total, "macs_ratio": 1.0, "params": params_before, "accuracy": accuracy,
        "agreement": 1.0, "latency_ms": None, "speedup": 1.0, "speedup_reliable": True,
        "onnx": str(out / original_onnx.name), "score": challenge_score(params_before, total).score,
    }]
    say(f"[2/5] exported original.onnx; onnxruntime held-out accuracy {100 * accuracy:.1f}% ({elapsed()})")

    # 3. one factorized model per budget.
    reports = {}
    options = demo_options()
    choice = (f"method 'auto' among {', '.join(DEMO_METHODS)}" if method == "auto" else f"method {method!r}")
    for index, budget in enumerate(budgets):
        say(f"[3/5] budget {index + 1}/{len(budgets)}: MACs <= {budget:g} x original, {choice}, "
            f"calibrated on {len(x_calib)} training images ({elapsed()})")
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # said below, once each, as "warning:" lines (not in warnings' format)
            warnings.simplefilter("ignore", ConvfactorWarning)
            fast = factorize(model, demo_policy(budget, method), example, calibration=x_calib, progress=progress,
                             auto_options=options)
        report = get_report(fast)
        for warning in report.all_warnings():
            say(f"      {warning_line(warning)}")
        reports[budget] = report
        path = work / f"factorized-macs{budget:g}.onnx"
        _export(fast, example, path)
        acc, predictions = _accuracy_onnx(path, x_test, y_test)
        methods_used = sorted({d.method for d in report.replaced})
        rows.append({
            "budget": budget, "macs": report.macs_after, "macs_ratio": report.macs_ratio,
            "params": report.params_after, "accuracy": acc,
            "agreement": float((predictions == original_predictions).mean()),
            "layers_replaced": len(report.replaced), "methods": methods_used,
            "onnx": str(out / path.name), "seconds": time.perf_counter() - t0,
            "score": challenge_score(report.params_after, report.macs_after).score,
        })
        say(f"      {len(report.replaced)} layers replaced ({', '.join(methods_used) or 'none'}); held-out "
            f"accuracy {100 * acc:.1f}%; exported {path.name} ({time.perf_counter() - t0:.0f} s)")

    # 4. latency: every model in the same rounds, so all rows share one original latency.
    say(f"[4/5] timing the original and {len(budgets)} factorized model(s) together in onnxruntime "
        f"({threads} thread(s), batch 1, >= {min_time:g} s) ({elapsed()})")
    paths = {"original": original_onnx, **{f"{b:g}": work / f"factorized-macs{b:g}.onnx" for b in budgets}}
    timing = time_together(paths, tuple(example.shape), threads=threads, min_time=min_time)
    for row, name in zip(rows, paths):
        stats = timing.stats[name]
        row["latency_ms"] = stats.median_ms
        row["latency_p10_ms"], row["latency_p90_ms"] = stats.p10_ms, stats.p90_ms
        row["speedup"] = timing.speedup(name)
        row["speedup_reliable"] = timing.reliable(name)
    say(_summary_table(rows, timing.rounds, threads))

    document = {
        "model": model_name, "metadata": meta, "method": method, "budgets": list(budgets), "threads": threads,
        "calibration_samples": len(x_calib), "auto_options": {"fractions": list(DEMO_FRACTIONS),
                                                              "methods": list(DEMO_METHODS), "vbmf": False},
        "rows": rows, "timing": timing.to_dict(), "reports": {f"{b:g}": r.to_dict() for b, r in reports.items()},
        "seconds": time.perf_counter() - started,
    }
    from .files.atomic import atomic_write_text

    atomic_write_text(work / "report.json", json.dumps(document, indent=2, default=str) + "\n", force=True)
    wrote = [str(out / "report.json")]
    if plot and _plot(work / "demo.png", rows, spectra, model_name):
        wrote.append(str(out / "demo.png"))
    elif plot:
        say("      (install matplotlib, e.g. pip install 'convfactor[plot]', for demo.png)")
    say(f"[5/5] wrote {', '.join(wrote)} and the ONNX models in {out}/ in {elapsed()}")
    document["files"] = wrote
    return document


def _summary_table(rows: list[dict[str, Any]], rounds: int, threads: int) -> str:
    """The summary; speedup = the original's latency / the row's, both as printed (3 decimals)."""
    original_ms = round(rows[0]["latency_ms"], 3)
    lines = [f"      summary: held-out accuracy in onnxruntime; latency: median of {rounds} rounds, each running "
             f"every model once (onnxruntime CPU, {threads} thread(s), batch 1); speedup = "
             f"{original_ms:.3f} ms / latency"]
    cells = []
    for row in rows:
        label = "original" if row["budget"] is None else f"MACs<={row['budget']:g}"
        latency = round(row["latency_ms"], 3)
        speedup = f"{original_ms / latency:.2f}x" if row["speedup_reliable"] else "noisy"
        cells.append([label, f"{row['macs'] / 1e6:.2f}M", f"{row['params'] / 1e3:.1f}k",
                      f"{100 * row['accuracy']:.1f}%", f"{100 * row['agreement']:.1f}%", f"{latency:.3f}ms",
                      speedup, f"{row['score']:.4f}"])
    headers = ["model", "MACs", "params", "accuracy", "agree", "latency", "speedup", "score"]
    lines += ["      " + line for line in format_grid(headers, cells, left=1)]
    if any(not row["speedup_reliable"] for row in rows):
        lines.append("      noisy: the per-round speedups spread over more than half their median even after "
                     "timing longer; the machine is too busy to tell (rerun with a longer --min-time)")
    slower = [r for r in rows[1:] if r["speedup_reliable"] and r["speedup"] < 1]
    if slower:
        lines.append("      note: rows with speedup < 1 ran slower than the original although their MACs fell: "
                     "on a network this small, extra layers cost more than the MACs they save")
    return "\n".join(lines)
