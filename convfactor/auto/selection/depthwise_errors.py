"""Output errors of the depthwise + pointwise form at every multiplier, from one SVD per layer.

``depthwise`` truncates the SVD of each input channel's slice W[:, c, :] (C_out/g x K, K the kernel volume)
to m terms. Level t of every channel together is the weight A_t B_t: A_t (O, C) holds each channel's t-th
left vector times its singular value, B_t (C, D) each channel's t-th right vector in that channel's block of
the patch. With a full patch covariance Sigma, (W - W_m) Sigma = W Sigma - sum_{t<m} A_t (B_t Sigma), and
B_t Sigma reads one K-column block of Sigma per channel (D^2 products, not D^2 * C), so the error of every
multiplier costs about one D x D quad in all, where decomposing and scoring each multiplier cost an SVD and
a quad per multiplier.
"""

from __future__ import annotations

import torch
from torch import nn

from ...methods.depthwise import channel_slices
from ..fits.data_aware import grouped_weight
from ..statistics.covariance import FullCovariance

__all__ = ["DepthwiseOutputErrors"]


class DepthwiseOutputErrors:
    """multiplier -> E||(W - W_m) p||^2 / signal for one layer and its full patch covariance.

    Args:
        layer: a Conv1d/Conv2d (any groups; its weight is read, never changed).
        sigma: the layer's full patch covariance (undamped: the error ``output_error2`` measures).
        signal: E||W p||^2, the denominator (the layer's other methods share it).
    """

    def __init__(self, layer: nn.Module, sigma: FullCovariance, signal: float):
        groups = layer.groups
        weight = grouped_weight(layer.weight, groups)  # (g, O, D), D = (C, K) channel-major
        g, o, d = weight.shape
        c = layer.weight.shape[1]
        k = d // c
        self.weight, self.sigma, self.signal = weight, sigma.sigma, signal
        # The method's own slices (C_in, O, K), channel q*C + j of group q: its truncation by construction.
        slices = channel_slices(weight.reshape(g * o, c, k), groups).reshape(g, c, o, k)
        u, s, vh = torch.linalg.svd(slices, full_matrices=False)  # (g, C, O, r), (g, C, r), (g, C, r, K)
        self.left = (u * s[:, :, None, :]).permute(0, 3, 2, 1)  # (g, r, O, C): A_t
        self.right = vh.transpose(1, 2)  # (g, r, C, K): B_t's blocks
        self.weight_sigma = weight @ self.sigma  # (g, O, D)
        self.approx = torch.zeros_like(weight)  # W_m
        self.approx_sigma = torch.zeros_like(weight)  # W_m Sigma
        self.errors: list[float] = []  # errors[m - 1]: multiplier m

    def __call__(self, multiplier: int) -> float:
        g, o, d = self.weight.shape
        _, _, c, k = self.right.shape
        blocks = self.sigma.reshape(g, d, c, k)  # Sigma[:, (c, :)]
        while len(self.errors) < multiplier:
            t = len(self.errors)
            a, b = self.left[:, t], self.right[:, t]  # (g, O, C), (g, C, K)
            b_sigma = torch.einsum("gdck,gck->gcd", blocks, b)  # B_t Sigma, (g, C, D)
            self.approx_sigma += a @ b_sigma
            self.approx += torch.einsum("goc,gck->gock", a, b).reshape(g, o, d)
            error = float(((self.weight_sigma - self.approx_sigma) * (self.weight - self.approx)).sum())
            self.errors.append(max(error, 0.0))
        error = self.errors[multiplier - 1]
        return error / self.signal if self.signal > 0 else error
