"""convfactor: factorize the convolutions of trained PyTorch networks, then measure the result.

    model_fast = convfactor.factorize(model, "spatial_svd:0.5", example_input)
    print(convfactor.get_report(model_fast))
    convfactor.export_onnx(model_fast, example_input, "fast.onnx")
    table = convfactor.inspect_model(model, example_input)  # per-layer MACs, params, spectra

The top level holds what a user needs first: ``factorize`` and its report, the policy, loading and
saving (ONNX export included), and the errors and warnings. The rest lives in its own package:

    convfactor.runtime    measurement in onnxruntime: check_fidelity, benchmark, quantize_onnx,
                          profile_layers/profile_model and their report classes
    convfactor.auto       the automatic policy: AutoOptions, LatencyOptions, DistillOptions, finetune
    convfactor.share      weight sharing (share_weights, sharing_report; convfactor.share_onnx: its export)
    convfactor.score      the course's challenge score (challenge_score)

Dependency direction: ``convfactor`` imports the top-level ``passes`` package (generic torch.fx passes);
``passes`` never imports ``convfactor``. ``convfactor.pipeline`` chains the passes for ``factorize`` and
``load``.
"""

__version__ = "0.1.0"

from .errors import ConvfactorError, PolicyError, RankError, TraceError  # noqa: E402
from .lazy_exports import lazy_getattr  # noqa: E402
from .methods import available_methods, get_method  # noqa: E402
from .policy import Policy, Rule  # noqa: E402
from .report import FactorizeReport, LayerDecision  # noqa: E402

# Loaded on first use (onnx, onnxruntime and the automatic policy are imported when needed).
_LAZY = {
    # factorize and its report
    "factorize": "api",
    "get_report": "api",
    "inspect_model": "inspection",
    # the policy's parts
    "Fidelity": "fidelity_spec",
    "Metric": "metric",
    # files
    "load": "files.serialize",
    "save_factorized": "files.serialize",
    "apply_plan": "files.serialize",
    "export_onnx": "runtime.export",
    "ExportResult": "runtime.export",
    # warnings factorize gives
    "FidelityWarning": "auto.search.verify",
    "SpeedWarning": "auto.search.verify",
    # which budget: one model at several targets, measured
    "sweep": "sweeps",
}

# Names the top level no longer holds -> where they live.
_MOVED = {
    **dict.fromkeys(["check_fidelity", "FidelityReport", "benchmark", "BenchmarkReport", "quantize_onnx",
                     "QuantizeResult", "profile_layers", "profile_model", "LayerProfileReport"], "convfactor.runtime"),
    **dict.fromkeys(["finetune", "resolve_policy", "AutoOptions", "LatencyOptions"], "convfactor.auto"),
    **dict.fromkeys(["share_weights", "sharing_report"], "convfactor.share"),
    "export_shared_onnx": "convfactor.share_onnx",
    "challenge_score": "convfactor.score",
}

__all__ = [
    "__version__",
    "FactorizeReport",
    "LayerDecision",
    "Policy",
    "Rule",
    "available_methods",
    "get_method",
    "ConvfactorError",
    "PolicyError",
    "RankError",
    "TraceError",
    *_LAZY,
]

__getattr__ = lazy_getattr(__name__, globals(), _LAZY, _MOVED,
                           modules=("runtime", "auto", "share", "share_onnx", "score", "files", "methods"))
