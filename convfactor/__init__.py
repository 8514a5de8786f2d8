"""convfactor: factorize the convolutions of trained PyTorch networks, then measure the result.

    model_fast = convfactor.factorize(model, "spatial_svd:0.5", example_input)
    print(convfactor.get_report(model_fast))
    convfactor.export_onnx(model_fast, example_input, "fast.onnx")
    print(convfactor.check_fidelity(model, model_fast, input_shape=(8, 3, 32, 32)))
    print(convfactor.benchmark(model, model_fast, input_shape=(1, 3, 32, 32)))
    convfactor.quantize_onnx(model_fast, "fast.int8.onnx", calibration=x_train[:128])  # int8, onnxruntime
    table = convfactor.inspect_model(model, example_input)  # per-layer MACs, params, spectra

Dependency direction: ``convfactor`` imports the top-level ``passes`` package (generic torch.fx passes);
``passes`` never imports ``convfactor``. ``convfactor.pipeline`` chains the passes for ``factorize`` and
``load``.
"""

from importlib import import_module

__version__ = "0.1.0"

from .errors import ConvfactorError, PolicyError, RankError, TraceError  # noqa: E402
from .methods import available_methods, get_method  # noqa: E402
from .policy import Policy, Rule  # noqa: E402
from .report import FactorizeReport, LayerDecision  # noqa: E402

# Loaded on first use: `import convfactor` stays quick (ONNX, onnxruntime are imported when needed).
_LAZY = {
    "factorize": "api",
    "get_report": "api",
    "export_onnx": "runtime.export",
    "ExportResult": "runtime.export",
    "check_fidelity": "runtime.fidelity",
    "FidelityReport": "runtime.fidelity_report",
    "benchmark": "runtime.benchmarking",
    "BenchmarkReport": "runtime.benchmarking",
    "quantize_onnx": "runtime.quantize",
    "QuantizeResult": "runtime.quantize",
    "profile_layers": "runtime.profiling",
    "profile_model": "runtime.profiling",
    "LayerProfileReport": "runtime.profiling",
    "Metric": "metric",
    "Fidelity": "fidelity_spec",
    "FidelityWarning": "auto.search.verify",
    "SpeedWarning": "auto.search.verify",
    "challenge_score": "score",
    "inspect_model": "inspection",
    "load": "files.serialize",
    "save_factorized": "files.serialize",
    "apply_plan": "files.serialize",
    "finetune": "auto",
    "resolve_policy": "auto",
    "AutoOptions": "auto",
    "LatencyOptions": "auto",
    "share_weights": "share",
    "sharing_report": "share",
    "export_shared_onnx": "share_onnx",
}

__all__ = [
    "__version__",
    "factorize",
    "get_report",
    "Policy",
    "Rule",
    "FactorizeReport",
    "LayerDecision",
    "available_methods",
    "get_method",
    "ConvfactorError",
    "PolicyError",
    "RankError",
    "TraceError",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'convfactor' has no attribute {name!r}")
