"""``--target KIND=F`` and ``--method M``: the common automatic policies without a YAML file.

They merge with ``--policy`` the way ``--max-rel-error`` does, the command line winning:

- ``--target macs=0.5`` (``params``, ``latency``) sets the policy's ``target``, replacing the file's;
- ``--method M`` (``auto`` or a method name) adds a last rule ``{match: "*", method: M}``: the file's
  rules decide first (first match wins), the layers they leave get M;
- without ``--policy``, ``--method`` alone is the policy, and ``--target`` alone implies ``--method auto``.

What the summary and the JSON say of the target afterwards is ``convfactor.target_outcome``'s.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

__all__ = ["add_target_arguments", "target_spec", "policy_from_options"]


def target_spec(text: str) -> tuple[str, float]:
    """``macs=0.5`` -> ("macs", 0.5): a kind the policy knows and a fraction in (0, 1).

    Raises:
        argparse.ArgumentTypeError: another form, kind or value.
    """
    from ..policy import TARGET_KINDS

    kind, sep, raw = text.partition("=")
    kind = kind.strip().lower()
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not sep or kind not in TARGET_KINDS or not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected KIND=FRACTION with KIND one of {', '.join(TARGET_KINDS)} and "
                                         f"FRACTION in (0, 1), e.g. macs=0.5; got {text!r}")
    return kind, value


def add_target_arguments(group: Any) -> None:
    """``--target`` and ``--method`` (into the automatic-policy group of ``convert``)."""
    group.add_argument("--target", type=target_spec, metavar="KIND=F",
                       help="a global budget as a fraction of the original: macs=0.5, params=0.3 or latency=0.8; "
                            "overrides the policy's target (without --policy it implies --method auto)")
    group.add_argument("--method", metavar="METHOD",
                       help="add a last policy rule giving every layer the policy leaves this method: auto (chosen "
                            "per layer) or a method name (see 'convfactor methods'); alone, the whole policy")


def policy_from_options(args: argparse.Namespace) -> tuple[Any, dict[str, str]]:
    """The policy of ``--policy`` merged with ``--target``/``--method``, and where each part came from.

    Raises:
        ConvfactorError: none of the three given, or an unknown ``--method``.
    """
    from ..errors import ConvfactorError
    from ..methods import available_methods
    from ..policy import AUTO, Policy, Rule

    if args.policy is None and args.method is None and args.target is None:
        raise ConvfactorError("convert needs a policy: --policy FILE_OR_SHORTHAND, --method METHOD (e.g. auto) or "
                              "--target KIND=F (e.g. macs=0.5)")
    method = args.method
    if method is not None and method != AUTO and method not in available_methods():
        raise ConvfactorError(f"--method {method}: unknown method (known: {AUTO}, "
                              f"{', '.join(sorted(available_methods()))})")
    try:
        policy = Policy.from_any(args.policy) if args.policy is not None else Policy()
    except ConvfactorError as error:  # the library names the rule or file; the user typed --policy
        raise type(error)(f"--policy: {error}") from None
    sources = {"rules": "--policy"} if args.policy is not None else {}
    if method is None and args.policy is None:
        method = AUTO  # --target alone
    if method is not None:
        policy = dataclasses.replace(policy, rules=(*policy.rules, Rule(method=method, match="*")))
        sources["rules"] = "--policy + --method" if args.policy is not None else "--method"
    if args.target is not None:
        policy = dataclasses.replace(policy, target=tuple(args.target))
        sources["target"] = "--target"
    elif policy.target is not None:
        sources["target"] = "policy"
    return policy, sources
