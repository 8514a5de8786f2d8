"""Silero VAD v5/v6 voice-activity detector (16 kHz): a conv encoder and an LSTM cell whose state
goes in and comes out at every 32 ms chunk.

Weights: the 16 kHz branch of ``silero_vad/data/silero_vad_op18_ifless.onnx`` shipped inside the
silero-vad package (the package's default model; its ``silero_vad_16k.safetensors`` holds other,
older weights), loaded into the architecture of the package's ``tinygrad_model.TinySileroVAD`` written out in torch
(an STFT as a fixed 1-D conv, four Conv1d + ReLU, ``LSTMCell(128, 128)``, a 1x1 conv and a
sigmoid). Checked against the package's ONNX model in onnxruntime (``check_against_onnx``). One
difference of interface: the state is batch-first, ``[N, 2, 128]`` (h and c), where the package's is
``[2, N, 128]``, so that every input and output of the network has its batch on the first axis.

    forward(chunk [N, 576] (64 samples of context + 512 new), state [N, 2, 128])
        -> (speech probability [N, 1], next state [N, 2, 128])

Data: speech synthesized with espeak-ng (several English voices and speeds) from sentences of
scikit-learn's dataset descriptions, resampled to 16 kHz, with pauses of 0.25-1.2 s between
utterances and white noise at 20-35 dB SNR; the true speech segments are where each utterance's
samples are above 1% of its peak. Calibration and held-out recordings use different sentences and
noise. Calibration inputs: every chunk of the calibration recordings with the state the original
network had there (streaming, as the package's ``get_speech_timestamps`` runs it).

Metric: the package's ``get_speech_timestamps_from_probs`` (threshold 0.5, its defaults) on the
network run in streaming over the held-out recordings; segments matched one-to-one to the true ones
at IoU >= 0.5: F-score (precision, recall), and the share of 32 ms frames classified as the truth.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RATE = 16000
CHUNK, CONTEXT = 512, 64
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-us+f3", "en-gb+m4", "en-us+f4")
TOLERANCE = 0.1  # segment F-score drop that still counts as the task kept


class SileroVAD(nn.Module):
    """Silero VAD 16 kHz (the package's TinySileroVAD, in torch; batch-first state)."""

    def __init__(self):
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, kernel_size=256, stride=128, bias=False)
        self.conv1 = nn.Conv1d(129, 128, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, kernel_size=3, padding=1)
        self.lstm_cell = nn.LSTMCell(128, 128)
        self.final_conv = nn.Conv1d(128, 1, 1)

    def forward(self, x: torch.Tensor, state: torch.Tensor):
        x = F.pad(x[:, None, :], (0, 64), mode="reflect")
        x = self.stft_conv(x)
        x = torch.sqrt(x[:, :129] ** 2 + x[:, 129:] ** 2)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x)).squeeze(-1)
        h, c = self.lstm_cell(x, (state[:, 0], state[:, 1]))
        out = torch.sigmoid(self.final_conv(F.relu(h[:, :, None])))
        return out.squeeze(1).mean(dim=1, keepdim=True), torch.stack([h, c], dim=1)


ONNX_FILE = ("silero_vad", "data", "silero_vad_op18_ifless.onnx")
# Our parameter names -> the 16 kHz branch's initializers in the package's ONNX file.
ONNX_NAMES = {"stft_conv.weight": "model.stft.forward_basis_buffer",
              **{f"conv{i + 1}.{p}": f"model.encoder.{i}.reparam_conv.{p}"
                 for i in range(4) for p in ("weight", "bias")},
              **{f"lstm_cell.{p}": f"model.decoder.rnn.{p}" for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")},
              "final_conv.weight": "model.decoder.decoder.2.weight", "final_conv.bias": "model.decoder.decoder.2.bias"}


def load() -> SileroVAD:
    """The network with the weights of the package's ONNX model (16 kHz branch)."""
    import onnx
    from onnx import numpy_helper

    from .onnx_import import package_file

    graph = onnx.load(package_file(*ONNX_FILE)).graph
    found = {t.name: t for t in graph.initializer}
    for node in graph.node:  # the STFT basis may sit in a Constant node inside the If branches
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found.update({t.name: t for t in attr.g.initializer})
                for sub in attr.g.node:
                    if sub.op_type == "Constant" and sub.output[0] in ONNX_NAMES.values():
                        found[sub.output[0]] = sub.attribute[0].t
    model = SileroVAD()
    model.load_state_dict({ours: torch.from_numpy(numpy_helper.to_array(found[theirs]).copy())
                           for ours, theirs in ONNX_NAMES.items()})
    return model.eval()


def stream(model, audio: np.ndarray, record: list | None = None) -> np.ndarray:
    """Speech probability of every 512-sample chunk, state carried from chunk to chunk (batch 1).
    ``record`` collects each (chunk input, state input)."""
    x = torch.from_numpy(np.pad(audio.astype(np.float32), (CONTEXT, (-len(audio)) % CHUNK)))
    state = torch.zeros(1, 2, 128)
    probs = []
    with torch.no_grad():
        for start in range(0, len(x) - CONTEXT, CHUNK):
            chunk = x[None, start:start + CONTEXT + CHUNK]
            if record is not None:
                record.append((chunk, state))
            p, state = model(chunk, state)
            probs.append(float(p))
    return np.array(probs)


def check_against_onnx(seconds: float = 3.0) -> float:
    """Largest difference of speech probability between this module and the package's ONNX model
    (``silero_vad.onnx``, onnxruntime) streaming over synthesized speech."""
    import onnxruntime as ort

    from .onnx_import import package_file

    audio = recordings("calibration", 1)[0][0][: int(seconds * RATE)]
    ours = stream(load(), audio)
    session = ort.InferenceSession(package_file("silero_vad", "data", "silero_vad.onnx"),
                                   providers=["CPUExecutionProvider"])
    x = np.pad(audio.astype(np.float32), (CONTEXT, (-len(audio)) % CHUNK))
    state = np.zeros((2, 1, 128), dtype=np.float32)
    theirs = []
    for start in range(0, len(x) - CONTEXT, CHUNK):
        out, state = session.run(None, {"input": x[None, start:start + CONTEXT + CHUNK], "state": state,
                                        "sr": np.array(RATE, dtype=np.int64)})
        theirs.append(float(out[0, 0]))
    return float(np.abs(ours - np.array(theirs)).max())


@functools.lru_cache(maxsize=1)
def _sentences() -> tuple[str, ...]:
    """Sentences of 4-14 words from scikit-learn's dataset descriptions."""
    import re

    from .textdata import words

    text = " ".join(words())
    out = []
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        n = len(sentence.split())
        if 4 <= n <= 14 and re.fullmatch(r"[A-Za-z ,'.;-]+", sentence):
            out.append(sentence)
    return tuple(dict.fromkeys(out))


def _speak(text: str, voice: str, speed: int) -> np.ndarray:
    """espeak-ng's rendering of ``text`` at 16 kHz, float in [-1, 1]."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    if shutil.which("espeak-ng") is None:
        raise SystemExit("error: espeak-ng is not installed (apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", path, text], check=True,
                       capture_output=True)
        rate, data = wavfile.read(path)
    audio = data.astype(np.float64) / 32768.0
    return resample_poly(audio, RATE, rate) if rate != RATE else audio


@functools.cache
def recordings(split: str, count: int, utterances: int = 6) -> list[tuple[np.ndarray, list[tuple[int, int]]]]:
    """``count`` recordings of ``utterances`` utterances each, and their true speech segments (samples)."""
    sentences = _sentences()
    half = len(sentences) // 2
    pool = sentences[:half] if split == "calibration" else sentences[half:]
    rng = np.random.default_rng({"calibration": 51, "held_out": 52}[split])
    out = []
    for _ in range(count):
        pieces, truth, at = [np.zeros(int(rng.uniform(0.3, 0.8) * RATE))], [], 0
        at = len(pieces[0])
        for _ in range(utterances):
            speech = _speak(pool[int(rng.integers(len(pool)))], VOICES[int(rng.integers(len(VOICES)))],
                            int(rng.integers(130, 200)))
            speech *= rng.uniform(0.3, 0.9) / max(1e-9, np.abs(speech).max())
            loud = np.flatnonzero(np.abs(speech) > 0.01 * np.abs(speech).max())
            truth.append((at + int(loud[0]), at + int(loud[-1])))
            gap = np.zeros(int(rng.uniform(0.25, 1.2) * RATE))
            pieces += [speech, gap]
            at += len(speech) + len(gap)
        audio = np.concatenate(pieces)
        power = np.mean(np.concatenate([p for p in pieces if p.any()]) ** 2)
        snr = 10 ** (rng.uniform(20, 35) / 10)
        audio = audio + rng.standard_normal(len(audio)) * np.sqrt(power / snr)
        out.append((audio.astype(np.float32), truth))
    return out


def segments(probs: np.ndarray, length: int) -> list[tuple[int, int]]:
    """The package's segmentation of per-chunk probabilities (its defaults)."""
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    found = get_speech_timestamps_from_probs(list(map(float, probs)), sampling_rate=RATE,
                                             audio_length_samples=length)
    return [(s["start"], s["end"]) for s in found]


def _segment_iou(a, b) -> float:
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union if union > 0 else 0.0


def segments_iou_match(found: list[tuple[int, int]], truth: list[tuple[int, int]], threshold: float = 0.5) -> int:
    """Found segments matched one-to-one (greedy) to true ones at IoU >= ``threshold``: the count."""
    hits, free = 0, list(truth)
    for seg in found:
        scores = [_segment_iou(seg, t) for t in free]
        if scores and max(scores) >= threshold:
            free.pop(int(np.argmax(scores)))
            hits += 1
    return hits


def segment_metric(run, data) -> dict:
    hits = n_pred = n_true = 0
    frames_right = frames = 0
    for audio, truth in data:
        probs = stream(run, audio)
        found = segments(probs, len(audio))
        n_pred, n_true = n_pred + len(found), n_true + len(truth)
        hits += segments_iou_match(found, truth)
        centres = np.arange(len(probs)) * CHUNK + CHUNK // 2
        speech = np.zeros(len(probs), dtype=bool)
        for s, e in truth:
            speech |= (centres >= s) & (centres < e)
        frames_right += int(((probs > 0.5) == speech).sum())
        frames += len(probs)
    precision, recall = hits / max(1, n_pred), hits / max(1, n_true)
    return {"fscore": 2 * precision * recall / max(1e-12, precision + recall), "precision": precision,
            "recall": recall, "segments_found": hits, "segments_true": n_true, "segments_predicted": n_pred,
            "frame_accuracy": frames_right / max(1, frames)}


def _chunks_and_states(data, limit: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(chunk, state) inputs of the original network streaming over ``data``, in batches of 64."""
    model, record = load(), []
    for audio, _ in data:
        stream(model, audio, record)
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(record), size=min(limit, len(record)), replace=False))
    x = torch.cat([record[i][0] for i in pick])
    s = torch.cat([record[i][1] for i in pick])
    return [(x[i:i + 64], s[i:i + 64]) for i in range(0, len(x), 64)]


def spec(quick: bool = False) -> dict:
    n_cal, n_eval = (2, 2) if quick else (4, 4)
    cal = recordings("calibration", n_cal)
    held = recordings("held_out", n_eval)
    validation = recordings("held_out", n_eval + 2)[-2:]
    calibration = _chunks_and_states(cal, 512)
    example = (calibration[0][0][:1], calibration[0][1][:1])

    def metric(run) -> dict:
        return segment_metric(run, held)

    return {
        "name": "silero_vad", "domain": "voice activity (conv encoder + LSTM cell, state in and out)",
        "source": "silero-vad (data/silero_vad_op18_ifless.onnx weights in torch)", "build": load,
        "example": example, "calibration": calibration,
        "validation": _chunks_and_states(validation, 256), "metric": metric,
        "metric_key": "fscore", "higher_is_better": True, "tolerance": TOLERANCE,
        "metric_desc": "speech segments at IoU 0.5 on held-out synthesized speech: F-score (frame accuracy)",
        "outputs": {"names": ["speech_probability", "state"], "class_scores": []},
        "input_shape": [tuple(t.shape) for t in example], "capture": {},
        "capture_fallback": {"trace": False},
    }
