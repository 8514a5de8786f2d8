"""The latency model: measured time of each candidate replacement of a layer, cached on disk.

    options        the ``latency=`` mapping, validated (``LatencyOptions``)
    round_robin    the interleaved timing loop both runtimes share
    torch_timing   PyTorch eager timing of layers and whole models
    ort_timing     onnxruntime timing of one-layer graphs and whole models
    int8_timing    the graphs quantized as ``quantize_onnx`` will quantize the result
    cache          measured times by key in one JSON file
    model          ``LatencyModel``: the above behind one interface for the allocator

Whole-model timing for reports (``benchmark``, ``time_together``) lives in ``convfactor.runtime``; this
package times candidate layers for the policy's cost model and builds on runtime's sessions and export.
May import: the core, ``convfactor.methods`` and ``convfactor.runtime``; nothing else of ``convfactor.auto``.
"""

__all__: list[str] = []
