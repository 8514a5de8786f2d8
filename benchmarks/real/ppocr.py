"""PP-OCRv4 text recognizer (text recognition), brought in from ONNX with onnx2torch.

Weights: ``ch_PP-OCRv4_rec_infer.onnx`` shipped inside rapidocr-onnxruntime (a PP-LCNet backbone
with an SVTR neck and a CTC head, 6,625 classes). Converted to a torch.fx GraphModule by onnx2torch
(``onnx_import.onnx_to_torch``). Preprocessing and CTC decoding follow the package's own
``TextRecognizer``: height 48, width 320, BGR scaled to [-1, 1], right-padded with zeros; greedy
CTC with the character list stored in the ONNX model's metadata (blank first, space last).

Metric: character error rate on text lines rendered with known ground truth (``textdata``).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from . import textdata

HEIGHT, WIDTH = 48, 320
ONNX_FILE = ("rapidocr_onnxruntime", "models", "ch_PP-OCRv4_rec_infer.onnx")


def onnx_path() -> str:
    from .onnx_import import package_file

    return package_file(*ONNX_FILE)


def load():
    from .onnx_import import onnx_to_torch

    return onnx_to_torch(onnx_path(), (1, 3, HEIGHT, WIDTH))


@functools.lru_cache(maxsize=1)
def characters() -> tuple[str, ...]:
    """CTC classes: blank, the dictionary in the ONNX metadata, then the space."""
    import onnx

    model = onnx.load(onnx_path(), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return ("<blank>",) + tuple(meta["character"].splitlines()) + (" ",)


def to_input(line: np.ndarray) -> torch.Tensor:
    """A (48, w<=320, 3) uint8 RGB line as the recognizer's (3, 48, 320) BGR input."""
    x = np.zeros((3, HEIGHT, WIDTH), dtype=np.float32)
    x[:, :, : line.shape[1]] = line[:, :, ::-1].transpose(2, 0, 1) / 127.5 - 1.0  # BGR, as cv2 reads
    return torch.from_numpy(x)


def ctc_decode(probs: np.ndarray) -> list[str]:
    """Greedy CTC: argmax per step, merge repeats, drop blanks."""
    chars = characters()
    out = []
    for idx in probs.argmax(axis=2):
        keep = np.ones(len(idx), dtype=bool)
        keep[1:] = idx[1:] != idx[:-1]
        keep &= idx != 0
        out.append("".join(chars[i] for i in idx[keep]))
    return out


def lines(count: int, seed: int):
    rng = np.random.default_rng(seed)
    pairs = [textdata.text_line(rng, HEIGHT, WIDTH) for _ in range(count)]
    return torch.stack([to_input(img) for img, _ in pairs]), [text for _, text in pairs]


def spec(quick: bool = False) -> dict:
    n_eval, n_cal = (32, 32) if quick else (96, 64)
    x_eval, truth = lines(n_eval, seed=11)
    x_cal, _ = lines(n_cal, seed=12)

    def metric(run) -> dict:
        with torch.no_grad():
            predicted = ctc_decode(run(x_eval).numpy())
        cer = textdata.character_error_rate(predicted, truth)
        exact = float(np.mean([p == t for p, t in zip(predicted, truth)]))
        return {"cer": cer, "line_accuracy": exact}

    return {
        "name": "ppocrv4_rec", "domain": "text recognition (from ONNX)",
        "source": "rapidocr-onnxruntime (ch_PP-OCRv4_rec_infer.onnx) via onnx2torch", "build": load,
        "example": (x_eval[:1],), "calibration": x_cal, "metric": metric,
        "metric_key": "cer", "higher_is_better": False,
        "metric_desc": "character error rate (exact-line accuracy)",
        "input_shape": (1, 3, HEIGHT, WIDTH), "capture": {},
        "capture_fallback": {"trace": False},
    }
