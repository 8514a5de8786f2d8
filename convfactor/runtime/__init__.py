"""What runs in onnxruntime: export to ONNX, sessions, and the measurements made with them.

    export, exporters, onnx_graph    a module -> one checked .onnx file (dynamo, else TorchScript)
    sessions                         an .onnx file (or a module, exported) -> a session and its feeds
    fidelity, fidelity_report        original vs factorized outputs, each against a tolerance
    benchmarking, shared_timing      interleaved A/B timing; several models timed together
    profiling, node_scopes           per-layer time, each onnxruntime node charged to its module
"""
