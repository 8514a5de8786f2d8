"""The efficient-deep-learning challenge score (CIFAR-10 course), for the original and factorized model.

    score = [1 - (p_s + p_u)] * (q_w / 32) * w / 5.6e6  +  (1 - p_s) * (max(q_w, q_a) / 32) * f / 2.8e8

w: parameter count, f: MACs per inference, p_s / p_u: structured / unstructured pruning ratios,
q_w / q_a: weight / activation bits. The references (5.6e6, 2.8e8) are ResNet-18's figures in half
precision, so a half-precision ResNet-18 scores about 2.0; lower is better.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import ConvfactorError

__all__ = ["ChallengeScore", "challenge_score", "bits_from_onnx"]

PARAMS_REFERENCE = 5.6e6
MACS_REFERENCE = 2.8e8


@dataclass(frozen=True)
class ChallengeScore:
    score: float
    params_term: float
    macs_term: float
    params: int
    macs: int
    weight_bits: int
    activation_bits: int
    structured_pruning: float
    unstructured_pruning: float

    def to_dict(self) -> dict:
        return asdict(self)


def challenge_score(
    params: int,
    macs: int,
    *,
    weight_bits: int = 32,
    activation_bits: int = 32,
    structured_pruning: float = 0.0,
    unstructured_pruning: float = 0.0,
) -> ChallengeScore:
    """The challenge score of a model with ``params`` weights and ``macs`` MACs per inference.

    Raises:
        ConvfactorError: bits outside 1..32 or pruning ratios outside [0, 1) or summing to >= 1.
    """
    for name, bits in (("weight bits", weight_bits), ("activation bits", activation_bits)):
        if not 1 <= bits <= 32:
            raise ConvfactorError(f"{name} must be in 1..32, got {bits}")
    p_s, p_u = structured_pruning, unstructured_pruning
    if not (0 <= p_s < 1 and 0 <= p_u < 1 and p_s + p_u < 1):
        raise ConvfactorError(f"pruning ratios must be in [0, 1) and sum to < 1, got structured={p_s}, "
                              f"unstructured={p_u}")
    params_term = (1 - (p_s + p_u)) * (weight_bits / 32) * params / PARAMS_REFERENCE
    macs_term = (1 - p_s) * (max(weight_bits, activation_bits) / 32) * macs / MACS_REFERENCE
    return ChallengeScore(params_term + macs_term, params_term, macs_term, params, macs, weight_bits,
                          activation_bits, p_s, p_u)


def bits_from_onnx(path) -> dict:
    """The score's bits read from an ONNX graph, not declared: ``{"weight_bits", "activation_bits"}``.

    The weight bits are the parameter-weighted mean width of the stored weights (int8 tensors 8, float
    ones 32, int32 biases 32), the activation bits the widest activation a Conv/Gemm/MatMul reads (see
    ``convfactor.runtime.quantized_graph``). A float model gives 32 and 32.
    """
    import onnx

    from .runtime.quantized_graph import graph_bits

    bits = graph_bits(onnx.load(str(path), load_external_data=False))
    return {"weight_bits": bits.weight_bits, "activation_bits": bits.activation_bits}
