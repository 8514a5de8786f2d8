"""Export original and factorized to ONNX, then check fidelity and latency in onnxruntime, side by side.

    python examples/export_and_check.py [--out-dir DIR]
"""

import argparse
import tempfile
from pathlib import Path

import convfactor
from convfactor.zoo import load_pretrained
from convfactor.zoo.digits import load_digits_split


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", default=None, help="where to write the ONNX files (default: a temp dir)")
    args = parser.parse_args(argv)
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="convfactor-example-"))
    out.mkdir(parents=True, exist_ok=True)

    model, meta = load_pretrained("resnet20_digits")  # shipped, trained on scikit-learn's digits
    x_test, _ = load_digits_split("test")
    example = x_test[:1]
    fast = convfactor.factorize(model, "spatial_svd:0.5", example)

    for name, module in (("original", model), ("factorized", fast)):
        result = convfactor.export_onnx(module, example, out / f"{name}.onnx", force=True)
        print(f"{name}: {result.path} ({result.exporter} exporter, {result.file_size / 1e6:.2f} MB)")

    # Real held-out images, not random ones: top-1 agreement is meaningful here, on the output declared
    # as class scores (the logits; agreement is never computed on an undeclared output).
    fidelity = convfactor.runtime.check_fidelity(out / "original.onnx", out / "factorized.onnx", x_test[:128],
                                         min_top1_agreement=0.95, max_rel_l2_error=0.5, min_cosine=0.9,
                                         min_snr_db=5.0, min_top5_overlap=None, outputs={0: {"kind": "scores"}})
    print(fidelity.render())
    bench = convfactor.runtime.benchmark(out / "original.onnx", out / "factorized.onnx", input_shape=(1, 3, 32, 32),
                                 threads=[1], min_time=0.5, progress=False)
    print(bench.render())


if __name__ == "__main__":
    main()
