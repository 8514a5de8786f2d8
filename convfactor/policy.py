"""The policy: which layers to factorize, with which method, at which rank. Plain data, YAML/JSON round trip.

Precedence, stated once: rules are tried in order and the **first rule that matches a layer wins**. A rule
matches a layer when its ``match`` glob matches the layer's qualified name (``fnmatch``, ``*`` crosses
dots) and, if ``types`` is given, the layer's type is listed. ``method: skip`` leaves matched layers as
they are. A layer no rule matches is left as is.

    {"rules": [
        {"match": "conv1", "method": "skip"},
        {"match": "layer4.*", "types": ["Conv2d"], "method": "tucker2", "rank": [128, 128]},
        {"match": "*", "types": ["Conv2d"], "method": "spatial_svd", "energy": 0.95, "align": 16}
    ]}

Rank spec per rule (at most one of ``rank``/``energy``; neither means full rank, i.e. exact):
  * ``rank: 16`` absolute (meaning per method, see ``convfactor methods``),
  * ``rank: [16, 32]`` one value per rank component (Tucker-2's r_in, r_out),
  * ``rank: 0.5`` a fraction of the full rank, so ``1.0`` is always exact,
  * ``energy: 0.99`` the smallest rank keeping that fraction of the squared singular values,
  * ``rank: vbmf`` the rank VBMF estimates from the layer's weight (spatial_svd, svd, tucker2; resolved
    by ``convfactor.auto``, see ``convfactor.auto.selection.vbmf``),
  * ``align: 16`` round ranks up to a multiple of 16 (onnxruntime's fast conv path works on blocks of 16),
  * ``only_if_cheaper: true`` leave a matched layer as is when its replacement would not cost fewer MACs
    (parameters without example inputs); the default for shorthands with a rank or energy below full
    (``"tucker2:0.5"``), not for full-rank (exact) ones nor for ranks that ``convfactor.auto`` resolves.

``method: auto`` lets convfactor choose the method (or to leave the layer as is) per layer. A top-level
``target: {macs: 0.5}`` (or ``params``/``latency``, a fraction of the original) asks for a global budget:
ranks and methods of the rules' layers are then allocated across the network (``convfactor.auto``)
instead of taken from each rule's rank. A policy with a target or an ``auto`` rule is *resolved* into a
plain policy of exact per-layer rules before factorization; the report keeps both.

A top-level ``fidelity: {max_rel_error: 0.05, min_agreement: 0.99}`` is the dual of the budget: the
result must *measure* within it (relative L2 error of the worst output slice, top-1 agreement of outputs
declared as class scores, the user's task metric; ``convfactor.fidelity_spec``) against the original on
inputs no fit saw (held out from the calibration data, or ``validation=``). With a target, the cheapest allocation
that holds the bound is returned and a missed target is reported; without one, the allocation costs as
little as the bound allows (``convfactor.auto.search.verify``).
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import PolicyError, UnknownMethodError
from .fidelity_spec import Fidelity, parse_fidelity
from .geometry import SUPPORTED_KINDS
from .ranks import rank_to_json

__all__ = ["Rule", "Policy", "Fidelity", "SKIP", "AUTO", "VBMF", "TARGET_KINDS"]

SKIP = "skip"
AUTO = "auto"
VBMF = "vbmf"
TARGET_KINDS = ("macs", "params", "latency")
_RULE_KEYS = ("match", "types", "method", "rank", "energy", "align", "only_if_cheaper")
_POLICY_KEYS = ("rules", "target", "fidelity")


@dataclass(frozen=True)
class Rule:
    """One policy rule. Field meanings are in the module docstring."""

    method: str
    match: str = "*"
    types: tuple[str, ...] = ()
    rank: int | float | tuple[int, ...] | str | None = None  # str: only "vbmf"
    energy: float | None = None
    align: int | None = None
    only_if_cheaper: bool = False  # skip a layer whose replacement would not cost fewer MACs

    def matches(self, name: str, kind: str) -> bool:
        return fnmatch.fnmatchcase(name, self.match) and (not self.types or kind in self.types)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"match": self.match}
        if self.types:
            out["types"] = list(self.types)
        out["method"] = self.method
        if self.rank is not None:
            out["rank"] = rank_to_json(self.rank)
        if self.energy is not None:
            out["energy"] = self.energy
        if self.align is not None:
            out["align"] = self.align
        if self.only_if_cheaper:
            out["only_if_cheaper"] = True
        return out

    def describe(self, index: int) -> str:
        """How error messages name this rule: its 1-based position and its match pattern."""
        return f"policy rule {index + 1} (match {self.match!r}, method {self.method!r})"


@dataclass(frozen=True)
class Policy:
    """An ordered list of rules; the first rule matching a layer decides for it."""

    rules: tuple[Rule, ...] = field(default_factory=tuple)
    target: tuple[str, float] | None = None  # ("macs" | "params" | "latency", fraction of the original)
    fidelity: Fidelity | None = None  # the bound the result must measure within (convfactor.auto.search.verify)

    @property
    def bound(self) -> Fidelity | None:
        """The fidelity section when it bounds something (output declarations alone bound nothing)."""
        return self.fidelity if self.fidelity is not None and self.fidelity.has_criterion else None

    @property
    def needs_resolution(self) -> bool:
        """True when convfactor.auto must resolve ranks or methods: a target, a fidelity bound, an ``auto``
        rule, ``rank: vbmf``."""
        return (self.target is not None or self.bound is not None
                or any(r.method == AUTO or r.rank == VBMF for r in self.rules))

    # -- matching -----------------------------------------------------------------------------
    def rule_for(self, name: str, kind: str) -> tuple[int, Rule] | None:
        """(index, rule) of the first rule matching the layer, or None."""
        for index, rule in enumerate(self.rules):
            if rule.matches(name, kind):
                return index, rule
        return None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_any(cls, spec: Policy | Mapping | str | os.PathLike) -> Policy:
        """A Policy from a Policy, a dict, a .yaml/.yml/.json path, or a method shorthand.

        The shorthand ``"spatial_svd"`` means every eligible layer, that method, full rank;
        ``"spatial_svd:0.5"`` (or ``"tucker2:energy=0.9"``) adds a rank spec.
        """
        if isinstance(spec, Policy):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        if isinstance(spec, os.PathLike) or (isinstance(spec, str) and _looks_like_path(spec)):
            return cls.load(spec)
        if isinstance(spec, str):
            return cls.from_shorthand(spec)
        raise PolicyError(
            f"a policy is a Policy, a dict, a .yaml/.json path or a method name, not {type(spec).__name__}"
        )

    @classmethod
    def from_shorthand(cls, text: str) -> Policy:
        method, _, rank_text = text.strip().partition(":")
        rule: dict[str, Any] = {"method": method}
        if rank_text:
            key, eq, value = rank_text.partition("=")
            if not eq:
                key, value = "rank", rank_text
            if key == "rank" and value == VBMF:
                return cls.from_dict({"rules": [{**rule, "rank": VBMF}]})
            if key not in ("rank", "energy", "align"):
                raise PolicyError(f"policy shorthand {text!r}: expected METHOD[:RANK] or METHOD:energy=E")
            rule[key] = _parse_number(value, f"policy shorthand {text!r}")
            # A shorthand that asks for compression only replaces layers where it saves MACs; a full-rank
            # one (no rank, rank 1.0, energy 1) is an exact rewrite and replaces every eligible layer.
            value = rule[key]
            full = (key == "rank" and isinstance(value, float) and value == 1.0) or (key == "energy" and value == 1)
            rule["only_if_cheaper"] = key != "align" and not full
        return cls.from_dict({"rules": [rule]})

    @classmethod
    def from_dict(cls, data: Mapping) -> Policy:
        if not isinstance(data, Mapping):
            raise PolicyError(f"a policy must be a mapping with a 'rules' list, got {type(data).__name__}")
        unknown = [k for k in data if k not in _POLICY_KEYS]
        if unknown:
            raise PolicyError(f"policy: unknown key {unknown[0]!r} (allowed: {', '.join(_POLICY_KEYS)})")
        rules = data.get("rules")
        if not isinstance(rules, list) or not rules:
            raise PolicyError("policy: 'rules' must be a non-empty list of rules")
        return cls(tuple(_parse_rule(i, r) for i, r in enumerate(rules)), _parse_target(data.get("target")),
                   parse_fidelity(data.get("fidelity")))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rules": [r.to_dict() for r in self.rules]}
        if self.target is not None:
            out["target"] = {self.target[0]: self.target[1]}
        if self.fidelity is not None:
            out["fidelity"] = self.fidelity.to_dict()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"policy is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "policy") -> Policy:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PolicyError(f"{source} is not valid YAML: {_yaml_error(exc)}") from None
        if data is None:
            raise PolicyError("policy file is empty")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Policy:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise PolicyError(f"policy file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"cannot read policy file {path}: {exc}") from None
        if path.suffix.lower() == ".json":
            return cls.from_json(text)
        return cls.from_yaml(text, source=f"policy file {path}")  # YAML is a superset of JSON: any suffix reads

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        text = self.to_json() + "\n" if path.suffix.lower() == ".json" else self.to_yaml()
        path.write_text(text)


def _yaml_error(exc: Exception) -> str:
    """PyYAML's problem with its line and column (1-based) and what it was parsing, on one line."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if not problem or mark is None:
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    message = f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        message += f" ({context} from line {context_mark.line + 1}, column {context_mark.column + 1})"
    return message


def _looks_like_path(text: str) -> bool:
    return text.lower().endswith((".yaml", ".yml", ".json")) or os.sep in text or os.path.exists(text)


def _parse_number(value: str, where: str) -> int | float:
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        raise PolicyError(f"{where}: {value!r} is not a number") from None


def _parse_rule(index: int, raw: Any) -> Rule:
    where = f"policy rule {index + 1}"
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: a rule must be a mapping, got {raw!r}")
    if "match" in raw:
        where += f" (match {raw['match']!r})"
    unknown = [k for k in raw if k not in _RULE_KEYS]
    if unknown:
        raise PolicyError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(_RULE_KEYS)})")
    if "method" not in raw:
        raise PolicyError(f"{where}: 'method' is required (a method name or 'skip')")
    method = raw["method"]
    if not isinstance(method, str):
        raise PolicyError(f"{where}: 'method' must be a string, got {method!r}")
    if method not in (SKIP, AUTO):
        from .methods import get_method  # late import: methods import the policy-free core only

        try:
            get_method(method)
        except UnknownMethodError as exc:
            raise PolicyError(f"{where}: {exc}") from None

    match = raw.get("match", "*")
    if not isinstance(match, str) or not match:
        raise PolicyError(f"{where}: 'match' must be a non-empty glob string, got {match!r}")

    types = raw.get("types", ())
    if isinstance(types, str):
        types = (types,)
    if not isinstance(types, (list, tuple)) or not all(isinstance(t, str) for t in types):
        raise PolicyError(f"{where}: 'types' must be a list of layer type names, got {types!r}")
    bad_types = [t for t in types if t not in SUPPORTED_KINDS]
    if bad_types:
        raise PolicyError(f"{where}: unknown layer type {bad_types[0]!r} (known: {', '.join(SUPPORTED_KINDS)})")

    rank = raw.get("rank")
    energy = raw.get("energy")
    align = raw.get("align")
    if method == SKIP and any(v is not None for v in (rank, energy, align)):
        raise PolicyError(f"{where}: method 'skip' takes no rank, energy or align")
    if rank is not None and energy is not None:
        raise PolicyError(f"{where}: give either 'rank' or 'energy', not both")
    rank = _check_rank_spec(rank, where)
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0 < energy <= 1):
        raise PolicyError(f"{where}: 'energy' must be a number in (0, 1], got {energy!r}")
    if align is not None and (isinstance(align, bool) or not isinstance(align, int) or align < 1):
        raise PolicyError(f"{where}: 'align' must be a positive int, got {align!r}")
    cheaper = raw.get("only_if_cheaper", False)
    if not isinstance(cheaper, bool):
        raise PolicyError(f"{where}: 'only_if_cheaper' must be true or false, got {cheaper!r}")
    return Rule(method=method, match=match, types=tuple(types), rank=rank,
                energy=None if energy is None else float(energy), align=align, only_if_cheaper=cheaper)


def _parse_target(raw: Any) -> tuple[str, float] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise PolicyError(f"policy: 'target' must be one of {{macs: F}}, {{params: F}}, {{latency: F}}, got {raw!r}")
    (kind, value), = raw.items()
    if kind not in TARGET_KINDS:
        raise PolicyError(f"policy: unknown target {kind!r} (known: {', '.join(TARGET_KINDS)})")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise PolicyError(f"policy: target {kind} must be a fraction of the original in (0, 1), got {value!r}")
    return kind, float(value)


def _check_rank_spec(rank: Any, where: str) -> int | float | tuple[int, ...] | str | None:
    if rank is None or rank == VBMF:
        return rank
    if isinstance(rank, bool):
        raise PolicyError(f"{where}: 'rank' must be an int, a float in (0, 1] or a list of ints, got {rank!r}")
    if isinstance(rank, int):
        if rank < 1:
            raise PolicyError(f"{where}: 'rank' must be >= 1, got {rank}")
        return rank
    if isinstance(rank, float):
        if not 0 < rank <= 1:
            raise PolicyError(f"{where}: a fractional 'rank' must be in (0, 1], got {rank}")
        return rank
    if isinstance(rank, (list, tuple)) and rank and all(
        isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rank
    ):
        return tuple(rank)
    raise PolicyError(f"{where}: 'rank' must be an int >= 1, a float in (0, 1] or a list of ints >= 1, got {rank!r}")
