"""``benchmarks/real/layer_forms.py``: the per-layer forms of a factorized model, read from its report, and the
latency model's float and int8 times of them, on a CREPE-shaped stand-in (Conv2d with (64, 1) kernels)."""
from __future__ import annotations

import math

import torch

import convfactor
from benchmarks.real.crepe import Crepe
from benchmarks.real.layer_forms import form_times, forms, layer_inputs

torch.set_num_threads(1)


def test_forms_and_their_float_and_int8_times_per_layer():
    torch.manual_seed(0)
    model = Crepe(widths=[16, 16, 16, 16, 16, 32]).eval()
    x = torch.randn(4, 1024)
    fast = convfactor.factorize(model, {"rules": [{"match": "conv[34]", "method": "tucker2", "rank": [8, 4]}]},
                                x[:1], concrete_args={"embed": False})
    chosen = forms(fast)
    assert chosen == {"conv3": ("tucker2", [8, 4]), "conv4": ("tucker2", [8, 4])}
    shapes = layer_inputs(model, (x,))
    # the input each layer really reads: batch 4, CREPE's padding of 63 along time included
    assert shapes["conv3"][0] == (4, 16, 64 + 63, 1) and shapes["classifier"][0] == (4, 32 * 4)
    report = {d.name: d for d in convfactor.get_report(fast).layers}
    assert shapes["conv3"][1] == report["conv3"].macs_before
    out = form_times(model, {k: shapes[k] for k in ("conv2", "conv3", "conv4")}, {"t2": chosen})
    assert set(out) == {"conv2", "conv3", "conv4"} and out["conv2"]["variants"] == {}
    for name in ("conv3", "conv4"):
        row = out[name]["variants"]["t2"]
        assert (row["method"], row["rank"]) == ("tucker2", (8, 4))
        assert math.isclose(row["macs_ratio"], report[name].macs_after / report[name].macs_before, rel_tol=1e-6)
        times = [out[name]["float_ms"], out[name]["int8_ms"], row["float_ms"], row["int8_ms"]]
        assert all(math.isfinite(t) and t > 0 for t in times)
