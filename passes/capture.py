"""Capture: symbolic tracing of the user's model into a GraphModule.

torch.fx cannot trace Python control flow on tensor values, ``len()`` of a traced tensor, and the like.
When it fails we say in which module it failed and what to do: mark that module as a leaf (it is then
called as a black box; Conv/Linear layers inside it are still replaced, module by module), or skip
tracing entirely (``trace=False``: module-level replacement, no BatchNorm folding).

Arguments of ``forward`` that are not tensors (``embed=False``, ``mode="fast"``, ``mask=None``) are made
concrete: with the caller's ``concrete_args``, else, when they have a default of a plain type (bool, int,
float, str, None) and no example input stands for them, with that default. The captured module keeps
them in its signature (``fast(x, embed=False)`` works) and rejects any other value with an error naming
the argument and the value it was traced with.

A ``torch.fx.GraphModule`` given as the model (e.g. one converted from ONNX by onnx2torch, whose
elementwise modules branch in Python) is used with its own graph when re-tracing it fails.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.fx
from torch import nn

from .errors import CaptureError, TracedArgumentError, one_line
from .manager import PassResult

__all__ = ["FactorizeTracer", "TracedArgumentError", "capture", "default_concrete_args", "CONCRETE_ARGS_META"]

CONCRETE_ARGS_META = "convfactor_concrete_args"  # GraphModule.meta key: {argument: traced value}
_PLAIN_TYPES = (bool, int, float, str, type(None))


@torch.fx.node.has_side_effect  # dead-code elimination must keep the check
def check_traced_argument(value: Any, name: str, traced: Any) -> Any:
    """Raise ``TracedArgumentError`` unless ``value`` is the value argument ``name`` was traced with.

    Called with a Proxy, the generated code is being traced again by a tracer that does not wrap this function
    (torch.fx's plain one, rebuilding a pickled network in a worker process): the check becomes a node of the new
    graph, so the rebuilt network checks its callers as the original does."""
    if isinstance(value, torch.fx.Proxy):
        return value.tracer.create_proxy("call_function", check_traced_argument, (value, name, traced), {})
    if value is traced or (type(value) is type(traced) and value == traced):
        return
    raise TracedArgumentError(
        f"this model was traced with {name}={traced!r} and cannot run with {name}={value!r}; "
        f"factorize the original again with concrete_args={{{name!r}: {value!r}}} "
        f"(CLI: --concrete-arg {name}={_cli_value(value)})"
    )


class FactorizeTracer(torch.fx.Tracer):
    """A Tracer that keeps the modules it is told to as leaves and remembers where it was.

    Args:
        leaf_modules: qualified module names (``"backbone.attn"``), class names (``"MyBlock"``) or
            classes (a library passes its own replacement modules) to call as black boxes instead of
            tracing through them.
    """

    def __init__(self, leaf_modules: Iterable[str | type] = ()):
        # check_traced_argument stays one node when the generated code is traced again (unpickling).
        super().__init__(autowrap_functions=(check_traced_argument,))
        leaf_modules = list(leaf_modules)
        self.leaf_classes = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self._stack: list[tuple[str, str]] = []
        self.failed_in: list[tuple[str, str]] | None = None
        self.failed_value: torch.fx.Proxy | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_classes):
            return True
        if module_qualified_name in self.leaf_names or type(m).__name__ in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self._stack.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module is the one to report
                self.failed_in = list(self._stack)
            raise
        finally:
            self._stack.pop()

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        self.failed_value = self.failed_value or obj  # the value the control flow depended on
        return super().to_bool(obj)

    def iter(self, obj: torch.fx.Proxy) -> Any:
        self.failed_value = self.failed_value or obj
        return super().iter(obj)


def capture(
    model: nn.Module,
    *,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: Mapping[str, Any] | None = None,
    n_inputs: int | None = None,
) -> PassResult:
    """Trace ``model`` (not copied: pass a copy) into a GraphModule with the same submodule names.

    Args:
        model: the module; a GraphModule that cannot be traced again is used with its own graph.
        leaf_modules: modules not to trace into (see ``FactorizeTracer``).
        concrete_args: values for arguments of ``forward`` that are not tensors.
        n_inputs: how many positional example inputs the model is called with (those arguments are
            never made concrete); None when unknown.
    Returns:
        A PassResult whose ``changes`` are notes for the report (one line each); the traced values of
        the concrete arguments are in ``graph_module.meta[CONCRETE_ARGS_META]``.
    Raises:
        CaptureError: naming the module where tracing stopped (or the non-tensor argument it stopped on),
            the construct, and the ways on.
    """
    given = dict(concrete_args or {})
    automatic = default_concrete_args(model, given, n_inputs)
    concrete = {**automatic, **given}
    tracer = FactorizeTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as exc:
        if isinstance(model, torch.fx.GraphModule):
            return _own_graph(model, exc, given)
        raise CaptureError(_explain(model, tracer, exc, n_inputs)) from exc
    _drop_string_annotations(graph)
    graph_module = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    _keep_signature(graph_module, concrete)
    notes = [f"forward argument {name!r} was not given: traced with its default {value!r} (other values are "
             f"refused; pass concrete_args to trace another)" for name, value in automatic.items()]
    return PassResult(graph_module, True, notes, "capture")


def _drop_string_annotations(graph: torch.fx.Graph) -> None:
    """Forget argument annotations that are strings (a module written with ``from __future__ import
    annotations``): torch.fx puts each in the generated code's globals, which then cannot be pickled (a
    GraphModule sent to a worker process, ``pickle.dumps``). Annotations change nothing the graph computes."""
    for node in graph.nodes:
        if isinstance(node.type, str):
            node.type = None


def default_concrete_args(model: nn.Module, given: Mapping[str, Any] | None = None,
                          n_inputs: int | None = None) -> dict[str, Any]:
    """The arguments of ``model.forward`` to trace with their defaults: those of a plain type (bool, int,
    float, str, None) not in ``given`` and not filled by the first ``n_inputs`` positional inputs."""
    result: dict[str, Any] = {}
    for index, param in enumerate(_forward_parameters(model)):
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.name in (given or {}):
            continue
        positional = param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)
        if n_inputs is not None and positional and index < n_inputs:
            continue
        if param.default is not param.empty and isinstance(param.default, _PLAIN_TYPES):
            result[param.name] = param.default
    return result


def _forward_parameters(model: nn.Module) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []


def _keep_signature(graph_module: torch.fx.GraphModule, concrete: Mapping[str, Any]) -> dict[str, Any]:
    """Give each plain concrete argument its own name back in the generated ``forward``, traced value as
    default, and one check node in place of torch.fx's ``_assert`` nodes (which exporters cannot handle)."""
    graph = graph_module.graph
    placeholders = {node.target: node for node in graph.nodes if node.op == "placeholder"}
    traced: dict[str, Any] = {}
    for name, value in concrete.items():
        node = placeholders.get(f"{name}_1")
        if node is None or not isinstance(value, _PLAIN_TYPES) or f"{name}_2" in placeholders:
            continue  # a structured value keeps torch.fx's own form
        for user in list(node.users):
            for check in list(user.users):  # torch._assert(eq)
                graph.erase_node(check)
            graph.erase_node(user)  # eq, or _assert_is_none
        node.target, node.args = name, (value,)
        traced[name] = value
    if traced:
        last = [node for node in graph.nodes if node.op == "placeholder"][-1]
        with graph.inserting_after(last):
            for name, value in reversed(traced.items()):
                graph.call_function(check_traced_argument, (placeholders[f"{name}_1"], name, value))
        graph.lint()
        graph_module.recompile()
    graph_module.meta[CONCRETE_ARGS_META] = dict(traced)
    return traced


def _own_graph(model: torch.fx.GraphModule, exc: Exception, given: Mapping[str, Any]) -> PassResult:
    """A GraphModule that cannot be traced again: rewrite its own graph (it already is one)."""
    model.graph.lint()
    model.meta.setdefault(CONCRETE_ARGS_META, {})
    notes = [f"the model is a torch.fx GraphModule that could not be traced again ({one_line(exc)}): "
             f"its own graph was used"]
    if given:
        notes.append(f"concrete_args {sorted(given)} were not applied: the GraphModule's own graph was used")
    return PassResult(model, False, notes, "capture")


def _cli_value(value: Any) -> str:
    """How ``--concrete-arg NAME=VALUE`` spells a value (JSON for true/false/null)."""
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)


def _argument_of(tracer: FactorizeTracer, model: nn.Module, n_inputs: int | None) -> str | None:
    """The non-tensor argument of ``forward`` the failed control flow depended on, if any."""
    if tracer.failed_value is None:
        return None
    params = {p.name: (i, p) for i, p in enumerate(_forward_parameters(model))}
    seen, stack, found = set(), [tracer.failed_value.node], []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder" and node.target in params:
            found.append(node.target)
        stack.extend(node.all_input_nodes)
    for name in sorted(found, key=lambda n: params[n][0]):
        index, param = params[name]
        beyond_inputs = n_inputs is not None and index >= n_inputs
        plain = param.annotation in _PLAIN_TYPES or param.annotation in {t.__name__ for t in _PLAIN_TYPES}
        if beyond_inputs or plain or (param.default is not param.empty and not isinstance(param.default, torch.Tensor)):
            return name
    return None


def _explain(model: nn.Module, tracer: FactorizeTracer, exc: Exception, n_inputs: int | None) -> str:
    cause = one_line(exc)
    name = type(model).__name__
    argument = _argument_of(tracer, model, n_inputs)
    if argument is not None:
        return (f"torch.fx could not trace {name}: its forward branches on argument {argument!r}, which is not a "
                f"tensor; make it concrete: concrete_args={{{argument!r}: VALUE}} "
                f"(CLI: --concrete-arg {argument}=VALUE)")
    if "control flow" in cause:
        construct = "Python control flow (if/while) on a tensor value"
    elif "iterate" in cause or "len(" in cause or "__len__" in cause:
        construct = "len() or iteration over a traced tensor"
    else:
        construct = f"{type(exc).__name__}: {cause}"
    where = f"the top-level forward of {name}"
    hint = "pass trace=False (CLI: --no-trace) for module-level replacement without a graph"
    if tracer.failed_in:
        path, cls = tracer.failed_in[-1]
        where = f"module {path!r} ({cls})"
        hint = (f"mark it as a leaf (leaf_modules=[{cls!r}], CLI: --leaf-module {cls}; its inner Conv/Linear "
                f"layers are still replaced) or {hint}")
    return f"torch.fx could not trace {name}: {construct} in {where}; {hint}"
