"""k-means weight sharing (Deep Compression's "trained quantization", as the course presents it): a storage pass.

Per layer, the weights of every Conv1d/Conv2d/Linear (the stages of factorized layers included; biases
are left alone) are clustered into K centroids by 1-D k-means with linear initialization (K centroids
evenly spaced between the smallest and the largest weight; scikit-learn's ``KMeans`` with that init
array), and each weight is replaced by its centroid. K per layer: ``bits`` (K = 2**bits), ``clusters``
(K), or ``elbow``: the K in 2, 4, ..., 256 where the relative-error-versus-log2(K) curve bends most (the
point farthest below the chord from its first to its last point). The layer is then stored as a codebook
of K floats plus one index per weight (``convfactor.share_onnx`` writes that ONNX file) and counts
q_w = ceil(log2 K) bits per weight in the challenge score.

k-means is fit on at most ``MAX_FIT_VALUES`` weights of a layer (a seeded subset; 1-D k-means needs few),
then every weight takes its nearest centroid, so memory and time stay linear in the layer's size.

Data-aware (``calibration=`` inputs): each weight W[o, j] is weighted in the k-means by its output
sensitivity E[p_j^2], the second moment on the calibration data of the input value it multiplies. A
layer's output error E||(W - W_shared) p||^2 is sum_(o, j) (W - W_shared)[o, j]^2 E[p_j^2] plus the
cross terms of correlated inputs, so the weighted k-means minimizes its diagonal part: centroids move
towards the weights that touch the inputs the data excites. The second moments are the diagonal patch
statistics of ``convfactor.auto.statistics.calibration`` (D values per layer: bounded memory).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConvfactorError
from .score import ChallengeScore, challenge_score

__all__ = ["SharedLayer", "SharingReport", "kmeans_1d", "elbow_clusters", "share_weights", "sharing_report",
           "output_sensitivities", "parse_share_spec", "finetune_codebooks", "ELBOW_CANDIDATES"]

SHARING_ATTR = "convfactor_sharing"
MAX_FIT_VALUES = 65536
ELBOW_CANDIDATES = (2, 4, 8, 16, 32, 64, 128, 256)
_SHARED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass
class SharedLayer:
    """One layer's sharing: K centroids for ``params`` weights, ``bits`` = ceil(log2 K) per index."""

    name: str
    clusters: int
    bits: int
    params: int
    weight_error: float  # ||W - W_shared|| / ||W||


@dataclass
class SharingReport:
    """What ``share_weights`` did, and the weight bits the challenge score counts."""

    layers: list[SharedLayer] = field(default_factory=list)
    params_total: int = 0

    @property
    def params_shared(self) -> int:
        return sum(layer.params for layer in self.layers)

    def storage_bits(self, unshared_bits: int = 32) -> int:
        """Bits to store every parameter: indices and codebooks (32-bit) of shared layers, the rest as is."""
        shared = sum(layer.params * layer.bits + 32 * layer.clusters for layer in self.layers)
        return shared + (self.params_total - self.params_shared) * unshared_bits

    def weight_bits(self, unshared_bits: int = 32) -> float:
        """The average q_w over all parameters (codebooks included)."""
        return self.storage_bits(unshared_bits) / self.params_total if self.params_total else float(unshared_bits)

    def score(self, macs: int, *, activation_bits: int = 32, unshared_bits: int = 32) -> ChallengeScore:
        """The challenge score with q_w the average bits per parameter (``weight_bits``)."""
        return challenge_score(self.params_total, macs, weight_bits=self.weight_bits(unshared_bits),
                               activation_bits=activation_bits)

    def to_dict(self) -> dict:
        return {"layers": [asdict(layer) for layer in self.layers], "params_total": self.params_total,
                "params_shared": self.params_shared, "weight_bits": self.weight_bits()}


def _nearest(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted ``centroids`` for each value (1-D, O(N log K))."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    return np.searchsorted(midpoints, values)


def kmeans_1d(values: np.ndarray, clusters: int, seed: int = 0,
              sample_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted centroids (K,), index of each value's centroid) by 1-D k-means with linear initialization.

    K is capped at the number of distinct values (then the sharing is exact). ``sample_weight`` (one
    nonnegative weight per value) makes it the weighted k-means: each centroid is the weighted mean of
    its values (the nearest centroid is the same either way).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    distinct = np.unique(values)
    if len(distinct) <= clusters:
        return distinct, _nearest(values, distinct)
    from sklearn.cluster import KMeans

    fit, weight = values, sample_weight
    if len(values) > MAX_FIT_VALUES:
        subset = np.random.default_rng(seed).choice(len(values), MAX_FIT_VALUES, replace=False)
        fit, weight = values[subset], None if sample_weight is None else sample_weight[subset]
    init = np.linspace(values.min(), values.max(), clusters).reshape(-1, 1)
    kmeans = KMeans(n_clusters=clusters, init=init, n_init=1, random_state=seed).fit(fit.reshape(-1, 1),
                                                                                    sample_weight=weight)
    centroids = np.unique(kmeans.cluster_centers_.ravel())  # sorted; empty clusters may merge
    return centroids, _nearest(values, centroids)


def _relative_error(values: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    norm = float(np.linalg.norm(values))
    return float(np.linalg.norm(values - centroids[labels])) / norm if norm else 0.0


def elbow_clusters(values: np.ndarray, candidates: tuple[int, ...] = ELBOW_CANDIDATES, seed: int = 0) -> int:
    """The course's elbow rule: the K where the error-versus-log2(K) curve is farthest below its chord."""
    values = np.asarray(values, dtype=np.float64).ravel()
    errors = np.array([_relative_error(values, *kmeans_1d(values, k, seed)) for k in candidates])
    x = np.log2(np.array(candidates, dtype=np.float64))
    chord = errors[0] + (errors[-1] - errors[0]) * (x - x[0]) / (x[-1] - x[0])
    return int(candidates[int(np.argmax(chord - errors))])


def share_weights(model: nn.Module, bits: int | None = None, clusters: int | None = None, elbow: bool = False,
                  seed: int = 0, calibration: Any = None) -> nn.Module:
    """A copy of ``model`` whose Conv/Linear weights are shared through per-layer k-means codebooks.

    Args:
        model: any module (a ``factorize`` result included); not modified.
        bits: K = 2**bits centroids per layer (1..8: indices fit a uint8).
        clusters: K directly (2..256).
        elbow: choose K per layer by the elbow rule (``elbow_clusters``).
        seed: seed of the k-means fit subset.
        calibration: optional inputs of ``model`` (a tensor, a tuple for a multi-input model, or a list of
            batches): weight each weight by its output sensitivity on them (see the module docstring).
    Returns:
        The shared copy, in the mode ``model`` was, with a ``SharingReport`` as ``convfactor_sharing``
        (see ``sharing_report``).
    Raises:
        ConvfactorError: not exactly one of bits/clusters/elbow, or one out of range.
    """
    chosen = [bits is not None, clusters is not None, bool(elbow)]
    if sum(chosen) != 1:
        raise ConvfactorError("share_weights: give exactly one of bits=, clusters= or elbow=True")
    if bits is not None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ConvfactorError(f"share_weights: bits must be an int in 1..8, got {bits!r}")
        clusters = 2**bits
    if clusters is not None and (isinstance(clusters, bool) or not isinstance(clusters, int)
                                 or not 2 <= clusters <= 256):
        raise ConvfactorError(f"share_weights: clusters must be an int in 2..256, got {clusters!r}")
    shared = copy.deepcopy(model)
    from .api import REPORT_ATTR

    if hasattr(model, REPORT_ATTR):  # a GraphModule's deepcopy drops the factorize report: keep it
        setattr(shared, REPORT_ATTR, getattr(model, REPORT_ATTR))
    report = SharingReport(params_total=sum(p.numel() for p in shared.parameters()))
    layers = {name: layer for name, layer in shared.named_modules() if type(layer) in _SHARED_TYPES}
    sensitivities = {} if calibration is None else output_sensitivities(shared, layers, calibration)
    for name, layer in layers.items():
        weight = layer.weight.detach()
        values = weight.cpu().to(torch.float64).numpy().ravel()
        k = elbow_clusters(values, seed=seed) if elbow else clusters
        centroids, labels = kmeans_1d(values, k, seed, sensitivities.get(name))
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(centroids[labels]).reshape(weight.shape).to(weight))
        report.layers.append(SharedLayer(name, len(centroids), max(1, math.ceil(math.log2(len(centroids)))),
                                         weight.numel(), _relative_error(values, centroids, labels)))
    setattr(shared, SHARING_ATTR, report)
    return shared


def output_sensitivities(model: nn.Module, layers: dict[str, nn.Module],
                        calibration: Any) -> dict[str, np.ndarray | None]:
    """{name: E[p_j^2] for every weight W[o, j] of the layer, flattened like its weight}: the diagonal patch
    statistics of each layer's input while ``model`` runs on ``calibration``."""
    from .auto.statistics.calibration import layer_statistics
    from .batches import calibration_batches

    multi = isinstance(calibration, tuple) and len(calibration) > 1
    batches = calibration_batches(calibration, len(calibration) if multi else 1,
                                  like=None if multi else [next(model.parameters())])
    was_training = model.training
    model.eval()
    try:
        # A budget of one byte makes every statistic the diagonal one (the variances, D values per layer).
        stats = layer_statistics(model, layers, batches, memory_budget=1.0)
    finally:
        model.train(was_training)
    out = {}
    for name, layer in layers.items():
        second = stats[name].covariance.diagonal().cpu().numpy()  # (g, D)
        rows_per_group = layer.weight.shape[0] // second.shape[0]
        per_weight = np.repeat(second, rows_per_group, axis=0).ravel()
        mean = float(per_weight.mean())
        # Relative, with a floor: a weight on an input the data never excites still counts a little.
        out[name] = per_weight / mean + 1e-6 if mean > 0 else None
    return out


def sharing_report(model: nn.Module) -> SharingReport:
    """The report ``share_weights`` attached to its result."""
    report = getattr(model, SHARING_ATTR, None)
    if report is None:
        raise ConvfactorError("this module was not produced by convfactor.share.share_weights (no sharing report)")
    return report


class _Codebook(nn.Module):
    """weight = codebook[indices]: the parametrization that lets a fine-tune move only the centroids."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        codebook, indices = torch.unique(weight.detach(), return_inverse=True)
        self.codebook = nn.Parameter(codebook)
        self.register_buffer("indices", indices)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.codebook[self.indices]


def finetune_codebooks(shared: nn.Module, teacher: nn.Module, data, **finetune_options):
    """Distil ``teacher`` into ``shared`` (in place) moving each shared layer's centroids, not its weights.

    Deep Compression's centroid fine-tuning: the gradient of every weight goes to its centroid, so the
    layers keep their K values and their indices. Other parameters (biases, BatchNorm) train as usual.
    Options as for ``convfactor.auto.finetune`` (steps, lr, loss, ...); returns its ``FinetuneResult``.
    """
    from torch.nn.utils import parametrize

    from .distill import finetune

    names = [layer.name for layer in sharing_report(shared).layers]
    for name in names:
        layer = shared.get_submodule(name)
        parametrize.register_parametrization(layer, "weight", _Codebook(layer.weight), unsafe=True)
        layer.parametrizations.weight.original.requires_grad_(False)
    try:
        return finetune(shared, teacher, data, **finetune_options)
    finally:
        for name in names:
            parametrize.remove_parametrizations(shared.get_submodule(name), "weight", leave_parametrized=True)


def parse_share_spec(text: str) -> dict:
    """``"bits=4"`` / ``"clusters=12"`` / ``"elbow"`` (the CLI's ``--share-weights``) -> share_weights kwargs.

    Raises:
        ConvfactorError: anything else (one line).
    """
    spec = text.strip()
    if spec == "elbow":
        return {"elbow": True}
    key, sep, value = spec.partition("=")
    if sep and key.strip() in ("bits", "clusters") and value.strip().isdigit():
        return {key.strip(): int(value)}
    raise ConvfactorError(f"--share-weights: expected bits=N, clusters=K or elbow, got {text!r}")
