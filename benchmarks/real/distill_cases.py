"""The real networks of ``benchmarks/distill_recovery.py``: model, calibration, unlabelled distillation inputs,
the held-out task metric and the policy's output declarations, per network.

Every set is generated from its own seed, so the metric's inputs are never calibrated, distilled, selected or
checked on:

  * crepe_tiny / crepe_full: 512 calibration frames of harmonic tones (seed 2), distillation frames (seed 4),
    metric the median absolute pitch error in cents on 256 other tones (seed 1; lower is better); its select
    set 256 tones of seed 5;
  * ppocr_rec: 256 rendered text lines for calibration (seed 12), distillation lines (seed 13), metric the
    character error rate of ``ppocr.spec``'s metric (lower is better): on its 96 evaluation lines (seed 11),
    or with ``quick_eval`` on the 32 of ``real_models.py --quick`` (the first 32 of the same seed; the lines of
    the results table, where the original reads 0.025); its select set 96 lines of seed 14. The lines the
    metric runs on are checked to share no image with the calibration, distillation or select lines
    (``disjoint``) before any work;
  * ppocr_det: 64 text scenes for calibration (seed 32), distillation scenes (seed 33), metric the line-box
    F-score at IoU 0.5 on the 32 scenes of ``real_models.py`` (seed 31; higher is better); its select set 32
    scenes of seed 34;
  * craft: 16 word scenes for calibration (seed 22, as ``craft.spec``) and 16 more as the validation set
    (seed 23: 8 select, 8 check; fewer than 32 calibration scenes hold nothing out on their own), distillation
    scenes (seed 24), metric the word-box F-score at IoU 0.5 on the 24 scenes of ``craft.spec`` (seed 21;
    higher is better); its select set 16 scenes of seed 25.

``logits`` (PP-OCRv4 rec only) cuts the recognizer's final softmax, so its output is the per-step class
logits, declared ``kind: scores`` along the class axis (``fidelity: {outputs: {0: {kind: scores, axis: 2}}}``):
the distillation's loss is then the KL divergence of each time step's class distribution (the softmax of the
logits is the original output), instead of the MSE of the probabilities, which the near-1 blank class
dominates. The greedy CTC decode takes the argmax, so the original's CER is the same.

``probabilities`` (PP-OCRv4 rec only) keeps the softmax and declares its output ``kind: probabilities`` along the
class axis (``fidelity: {outputs: {0: {kind: probabilities, axis: 2}}}``): the same KL per time step, taken on
the log of the probabilities the network returns, with no change to the network.

``metric_decides``: the metric gets its select set (``convfactor.Metric(..., select=...)``), so the distillation
is stopped and kept or rejected by the task metric on that set (``convfactor.distill.criterion``); the metric
reported (before, after, the final check) stays the one on the first set, which no decision saw.

``pooled`` (CREPE only) declares the network's one output as a single slice measured pooled (``fidelity:
{reduce: pooled, outputs: {0: {slices: {all: [0, 360]}}}}``): the distillation's MSE is then relative to
the whole output's mean square instead of each slice's own, and the select error that stops and judges it is
the pooled one.
"""
from __future__ import annotations

import hashlib

import torch

import convfactor

__all__ = ["NETWORKS", "case", "metric_inputs", "disjoint"]

NETWORKS = ("crepe_tiny", "crepe_full", "ppocr_rec", "ppocr_det", "craft")


def case(network: str, calibration: int | None, distill_samples: int | None, pooled: bool = False,
         metric_decides: bool = False, logits: bool = False, probabilities: bool = False,
         quick_eval: bool = False) -> dict:
    """{model, calib, validation (or None), distill_data (or None), metric (convfactor.Metric), declared (policy
    without target), metric_desc, metric_original (ppocr_rec: the original's reported metric, or None)} for
    ``network``."""
    if quick_eval and network != "ppocr_rec":
        raise SystemExit("error: --quick-eval is for ppocr_rec (real_models.py --quick's 32 evaluation lines)")
    if network.startswith("crepe"):
        out = _crepe(network.split("_")[1], calibration or 512, distill_samples, metric_decides)
    elif network == "ppocr_rec":
        out = _ppocr_rec(calibration or 256, distill_samples, metric_decides, quick_eval)
    elif network == "ppocr_det":
        out = _ppocr_det(calibration or 64, distill_samples, metric_decides)
    elif network == "craft":
        out = _craft(calibration or 16, distill_samples, metric_decides)
    else:
        raise SystemExit(f"error: --network must be one of {', '.join(NETWORKS)}, got {network!r}")
    declared = {"rules": [{"types": ["Conv2d"], "method": "auto"}]}
    if logits and network != "ppocr_rec":
        raise SystemExit("error: --logits is for ppocr_rec (its [N, T, 6625] softmax output)")
    if probabilities and network != "ppocr_rec":
        raise SystemExit("error: --probabilities is for ppocr_rec (its [N, T, 6625] softmax output)")
    if logits and probabilities:
        raise SystemExit("error: --logits and --probabilities exclude each other (logits cut the softmax)")
    if logits:
        out["model"] = _without_softmax(out["model"])
        declared["fidelity"] = {"outputs": {0: {"kind": "scores", "axis": 2}}}
    if probabilities:
        declared["fidelity"] = {"outputs": {0: {"kind": "probabilities", "axis": 2}}}
    if pooled and not network.startswith("crepe"):
        raise SystemExit("error: --pooled is for the CREPE networks (one [N, 360] output)")
    if pooled:
        declared["fidelity"] = {"reduce": "pooled", "outputs": {0: {"slices": {"all": [0, out.pop("channels")]}}}}
    out.pop("channels", None)
    out.setdefault("validation", None)
    out.setdefault("metric_original", None)
    out["declared"] = declared
    return out


def _crepe(capacity: str, calibration: int, distill_samples: int | None, metric_decides: bool) -> dict:
    from . import crepe

    calib, _ = crepe.harmonic_frames(calibration, seed=2)
    data = None if not distill_samples else crepe.harmonic_frames(distill_samples, seed=4)[0]

    def median_cents(seed: int):
        x_test, f0 = crepe.harmonic_frames(256, seed=seed)

        def metric(run):
            with torch.no_grad():
                return crepe.pitch_metrics(run(x_test).numpy(), f0)["median_cents"]
        return metric

    return {"model": crepe.load(capacity), "calib": calib, "distill_data": data, "channels": crepe.PITCH_BINS,
            "metric": convfactor.Metric(median_cents(1), name="median_cents", higher_is_better=False,
                                        select=median_cents(5) if metric_decides else None),
            "metric_desc": "median abs. pitch error, cents (256 test tones)"}


def _ppocr_rec(calibration: int, distill_samples: int | None, metric_decides: bool, quick_eval: bool) -> dict:
    from . import ppocr, textdata

    model = ppocr.load()
    calib, _ = ppocr.lines(calibration, seed=12)
    data = None if not distill_samples else ppocr.lines(distill_samples, seed=13)[0]
    spec = ppocr.spec(quick=quick_eval)
    x_select, truth_select = ppocr.lines(96, seed=14)

    def reported(run) -> float:
        return spec["metric"](run)["cer"]

    def select(run) -> float:
        with torch.no_grad():
            predicted = ppocr.ctc_decode(run(x_select).numpy())
        return textdata.character_error_rate(predicted, truth_select)

    original, x_eval = metric_inputs(reported, model)
    disjoint(x_eval, {"calibration": calib, "distillation": data, "metric select": x_select})
    return {"model": model, "calib": calib, "distill_data": data, "metric_original": original,
            "metric": convfactor.Metric(reported, name="cer", higher_is_better=False,
                                        select=select if metric_decides else None),
            "metric_desc": f"character error rate ({len(x_eval)} rendered lines of ppocr.spec"
                           f"{'(quick=True)' if quick_eval else ''})"}


def metric_inputs(metric, model) -> tuple[float, torch.Tensor]:
    """``metric(model)`` and the inputs it ran ``model`` on (every call's, concatenated): the lines it is
    measured on, as the metric itself loads them."""
    seen = []

    def run(x):
        seen.append(x)
        return model(x)

    with torch.no_grad():
        value = metric(run)
    return float(value), torch.cat(seen)


def disjoint(reported: torch.Tensor, others: dict[str, torch.Tensor | None]) -> None:
    """Stop (one error line) when an input the metric is reported on is also in one of ``others`` (by the exact
    bytes of each sample): a reported number must come from inputs no fit, distillation or decision saw."""
    def digests(x: torch.Tensor) -> set[bytes]:
        return {hashlib.sha1(sample.contiguous().numpy().tobytes()).digest() for sample in x}

    held_out = digests(reported)
    for name, x in others.items():
        shared = 0 if x is None else len(held_out & digests(x))
        if shared:
            raise SystemExit(f"error: {shared} of the {len(reported)} inputs the metric is reported on are also "
                             f"{name} inputs")


def _without_softmax(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The recognizer's graph returning what its final softmax takes (the per-step class logits)."""
    graph = model.graph
    output = next(node for node in graph.nodes if node.op == "output")
    softmax = output.args[0]
    if softmax.op != "call_module" or "Softmax" not in str(softmax.target):
        raise SystemExit(f"error: --logits: the recognizer's output is {softmax.target}, not a softmax")
    output.args = (softmax.args[0],)
    graph.erase_node(softmax)
    model.recompile()
    return model


def _ppocr_det(calibration: int, distill_samples: int | None, metric_decides: bool) -> dict:
    from . import ppocr_det, textdata

    size = ppocr_det.SIZE
    calib, _ = textdata.scene_batch(calibration, 32, size, ppocr_det.to_input, "lines")
    data = (None if not distill_samples else
            textdata.scene_batch(distill_samples, 33, size, ppocr_det.to_input, "lines")[0])

    def fscore(seed: int):
        x_eval, truth = textdata.scene_batch(32, seed, size, ppocr_det.to_input, "lines")
        boxes = textdata.detection_metric(x_eval, truth, lambda out: ppocr_det.detect_boxes(out[0]))
        return lambda run: boxes(run)["fscore"]

    return {"model": ppocr_det.load(), "calib": calib, "distill_data": data,
            "metric": convfactor.Metric(fscore(31), name="fscore", higher_is_better=True,
                                        select=fscore(34) if metric_decides else None),
            "metric_desc": "line-box F-score at IoU 0.5 (32 text scenes)"}


def _craft(calibration: int, distill_samples: int | None, metric_decides: bool) -> dict:
    from . import craft, textdata

    size = craft.SIZE
    calib, _ = textdata.scene_batch(calibration, 22, size, craft.to_input, "words")
    validation, _ = textdata.scene_batch(16, 23, size, craft.to_input, "words")
    data = (None if not distill_samples else
            textdata.scene_batch(distill_samples, 24, size, craft.to_input, "words")[0])

    def fscore(count: int, seed: int):
        x_eval, truth = textdata.scene_batch(count, seed, size, craft.to_input, "words")
        boxes = textdata.detection_metric(x_eval, truth, craft.detect_boxes)
        return lambda run: boxes(run)["fscore"]

    return {"model": craft.load(), "calib": calib, "validation": validation, "distill_data": data,
            "metric": convfactor.Metric(fscore(24, 21), name="fscore", higher_is_better=True,
                                        select=fscore(16, 25) if metric_decides else None),
            "metric_desc": "word-box F-score at IoU 0.5 (24 word scenes)"}
