"""The efficient-deep-learning challenge score of a model before and after factorization.

score = [1-(p_s+p_u)]*(q_w/32)*w/5.6e6 + (1-p_s)*(max(q_w,q_a)/32)*f/2.8e8  (lower is better)

    python examples/challenge_score.py
"""

import convfactor
from convfactor.score import challenge_score
from convfactor.zoo import load_pretrained
from convfactor.zoo.digits import load_digits_split


def main() -> None:
    model, _ = load_pretrained("resnet20_digits")
    example = load_digits_split("test")[0][:1]
    fast = convfactor.factorize(model, "spatial_svd:energy=0.9", example)
    report = convfactor.get_report(fast)
    for bits in (32, 16):
        before = challenge_score(report.params_before, report.macs_before, weight_bits=bits, activation_bits=bits)
        after = challenge_score(report.params_after, report.macs_after, weight_bits=bits, activation_bits=bits)
        print(f"{bits}-bit: score {before.score:.4f} -> {after.score:.4f} "
              f"(params {report.params_before} -> {report.params_after}, "
              f"MACs {report.macs_before} -> {report.macs_after})")


if __name__ == "__main__":
    main()
