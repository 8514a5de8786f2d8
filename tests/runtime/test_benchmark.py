"""benchmark: well-formed timings of both models per thread setting (structure only, no speed claims)."""

from __future__ import annotations

import copy
import json

import onnxruntime as ort
import pytest
import torch
from torch import nn

from convfactor.errors import ConvfactorError
from convfactor.methods import get_method
from convfactor.runtime.benchmarking import available_cores, benchmark, cpu_model
from convfactor.runtime.export import export_onnx

EXPORTER = "torchscript"


def _models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    factorized = copy.deepcopy(original)
    method = get_method("spatial_svd")
    factorized[2] = method.decompose(original[2], method.resolve_rank(original[2], 0.5))
    return original, factorized


def _check_stats(stats, runs: int) -> None:
    assert stats.runs == runs
    assert 0 < stats.min_ms <= stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert stats.mean_ms > 0


def test_default_threads_and_well_formed_numbers(capsys):
    original, factorized = _models()
    report = benchmark(original, factorized, input_shape=(1, 3, 8, 8), warmup=2, repeats=5, min_time=0.0,
                       exporter=EXPORTER, remeasure=0)
    assert [r.threads for r in report.results] == sorted({1, available_cores()})
    for result in report.results:
        assert result.pairs == 5  # min_time 0, no re-measuring: exactly `repeats` pairs
        _check_stats(result.original, 5)
        _check_stats(result.factorized, 5)
        assert 0 < result.speedup_p10 <= result.speedup <= result.speedup_p90
        assert result.seconds > 0
    assert report.onnxruntime_version == ort.__version__
    assert report.cpu_model == cpu_model() and report.cpu_model
    assert report.logical_cores >= report.available_cores >= 1
    assert report.inputs_generated and report.input_shapes == ((1, 3, 8, 8),)
    assert report.models["original"]["given_as"] == "module" and report.models["original"]["path"] is None
    json.dumps(report.to_dict(), allow_nan=False)
    text = report.render()
    assert "speedup" in text and report.cpu_model in text
    assert capsys.readouterr().err == ""  # no progress bar when stderr is not a terminal


def test_onnx_paths_explicit_threads_and_min_time(tmp_path):
    original, factorized = _models()
    x = torch.randn(2, 3, 8, 8)
    a = export_onnx(original, x, tmp_path / "a.onnx", exporter=EXPORTER).path
    b = export_onnx(factorized, x, tmp_path / "b.onnx", exporter=EXPORTER).path
    report = benchmark(a, b, x, threads=1, warmup=0, repeats=3, min_time=0.05, graph_optimization="basic")
    (result,) = report.results
    assert result.threads == 1 and result.pairs >= 3 and result.seconds >= 0.05
    _check_stats(result.original, result.pairs)
    assert report.graph_optimization == "basic" and not report.inputs_generated
    assert report.models["factorized"] == {"given_as": "onnx", "path": str(b)}


def test_bad_arguments_are_user_errors(tmp_path):
    original, factorized = _models()
    static = export_onnx(original, torch.randn(1, 3, 8, 8), tmp_path / "s.onnx", exporter=EXPORTER,
                         dynamic_batch=False).path
    with pytest.raises(ConvfactorError, match="cannot run"):  # batch 2 into a batch-1 model
        benchmark(static, static, torch.randn(2, 3, 8, 8), threads=1, repeats=1, min_time=0)
    with pytest.raises(ConvfactorError, match="input_shape"):
        benchmark(original, factorized)
    with pytest.raises(ConvfactorError, match="threads"):
        benchmark(original, factorized, input_shape=(1, 3, 8, 8), threads=0, exporter=EXPORTER)
    with pytest.raises(ConvfactorError, match="repeats"):
        benchmark(original, factorized, input_shape=(1, 3, 8, 8), repeats=0, exporter=EXPORTER)
    with pytest.raises(ConvfactorError, match="graph_optimization"):
        benchmark(original, factorized, input_shape=(1, 3, 8, 8), graph_optimization="max",
                  exporter=EXPORTER, repeats=1, min_time=0)


def test_one_brand_with_other_vector_units_is_another_machine(monkeypatch):
    # Two VMs of this repository's both read "AMD EPYC": one AVX2-only, one with AVX-512 and VNNI. Their
    # layer timings differ, so the latency cache's machine key must tell them apart.
    import convfactor.runtime.cpu as cpu
    from convfactor.auto.latency.cache import machine_key

    avx2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\n"
    avx512 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx avx2 avx512f avx512_vnni avx512_bf16\n"
    assert cpu.parse_cpuinfo(avx2) == ("AMD EPYC", {"fpu", "sse2", "avx", "avx2", "fma"})
    assert cpu.parse_cpuinfo("processor : 0\n") == (None, set())
    keys = []
    for text in (avx2, avx512):
        monkeypatch.setattr(cpu, "_cpuinfo", lambda text=text: text)
        keys.append(machine_key())
    assert keys[0]["cpu"] == "AMD EPYC [avx2]" and keys[1]["cpu"] == "AMD EPYC [avx2 avx512f avx512_vnni avx512_bf16]"
