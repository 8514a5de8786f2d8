"""The Python API on a model of your own: factorize, read the report, check the result.

    python examples/api_quickstart.py
"""

import torch
from torch import nn

import convfactor


class SmallNet(nn.Module):
    """Any traceable network works; this one stands in for yours."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        )
        self.classifier = nn.Linear(64, 10)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def main() -> None:
    torch.manual_seed(0)
    model = SmallNet().eval()  # in practice: your trained model
    x = torch.randn(1, 3, 32, 32)

    # Full rank first: every method reproduces the original layer exactly.
    exact = convfactor.factorize(model, "spatial_svd", x)
    error = ((exact(x) - model(x)).norm() / model(x).norm()).item()
    print(f"full-rank spatial SVD: relative output error {error:.1e}")
    assert error < 1e-5

    # Then compress: half the rank of every conv, a truncated SVD for the classifier.
    policy = {"rules": [
        {"match": "features.*", "types": ["Conv2d"], "method": "spatial_svd", "rank": 0.5},
        {"match": "classifier", "method": "svd", "rank": 0.5},
    ]}
    fast = convfactor.factorize(model, policy, x)
    report = convfactor.get_report(fast)
    print(report)  # per-layer table: method, rank, params, MACs, weight error, skip reasons
    assert len(report.replaced) == 4 and report.macs_after < report.macs_before

    # The caller's model is untouched; the report is plain data.
    assert all(not isinstance(m, convfactor.methods.FactorizedLayer) for m in model.modules())
    plan = report.plan()
    print("plan:", plan["layers"]["features.0"])


if __name__ == "__main__":
    main()
