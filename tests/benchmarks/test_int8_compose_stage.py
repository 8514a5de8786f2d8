"""int8_compose's ``_OnnxStage``: an ONNX file run in a torch pipeline gives the torch model's outputs,
for row counts that are and are not whole batches (the last chunk is padded and cut back)."""

from __future__ import annotations

import torch

from benchmarks.int8_compose import _OnnxStage
from convfactor.runtime.export import export_onnx


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.a, self.b = torch.nn.Linear(6, 5), torch.nn.Linear(5, 2), torch.nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.a(h), self.b(h)


def test_the_onnx_stage_matches_the_model_on_partial_batches(tmp_path):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    path = export_onnx(model, (torch.randn(4, 6),), tmp_path / "m.onnx", dynamic_batch=False).path
    stage = _OnnxStage(path, batch=4)
    for rows in (1, 4, 7):
        x = torch.randn(rows, 6)
        got, want = stage(x), model(x)
        assert [tuple(g.shape) for g in got] == [(rows, 2), (rows, 3)]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w.detach(), rtol=1e-4, atol=1e-5)
