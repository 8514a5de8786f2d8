"""Run a torch.fx graph once, and from any of its nodes re-run only the rest of it with that node's value replaced.

A sensitivity probe changes one layer's output; everything computed before that layer is the original's.
So the original graph advances once per batch, keeping only its *frontier*: the values computed before the
current node and used at or after it. From the frontier at a layer's node, ``suffix`` runs the nodes after
it with the layer's value replaced and returns the network's output, leaving the frontier as it was: a
frontier value that a node after the layer changes in place (found by ``inspect``, which watches tensor
versions in one run, aliases included) is copied first, its aliasing kept; the others are read as they
are. (In a VGG/U-Net with ``ReLU(inplace=True)`` the in-place ops change values made after the probed layer,
so a probe copies nothing.)

A layer is run this way only when ``root`` is a ``GraphModule`` that calls it at exactly one node (and no
other called module contains it); ``probe_nodes`` says which.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves, tree_map

__all__ = ["FRONTIER_BYTES", "probe_nodes", "Frontier", "GraphRunner"]

FRONTIER_BYTES = 256 * 2**20  # frontiers held at once (whole batches; at least one)


def probe_nodes(root: nn.Module, layers: Mapping[str, nn.Module]) -> dict[str, fx.Node]:
    """{name: the one call_module node running that layer} for the layers a suffix can probe (none unless
    ``root`` is a GraphModule); a layer called at several nodes, or inside another called module, is left out."""
    if not isinstance(root, fx.GraphModule):
        return {}
    calls: dict[str, list[fx.Node]] = {name: [] for name in layers}
    for node in root.graph.nodes:
        if node.op != "call_module":
            continue
        module = root.get_submodule(node.target)
        inside = {id(m) for m in module.modules()}
        for name, layer in layers.items():
            if id(layer) in inside:
                calls[name].append(node if module is layer else None)
    return {name: found[0] for name, found in calls.items() if len(found) == 1 and found[0] is not None}


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


class Frontier:
    """One batch's run of the original graph: its live values (``env``), the next node to run, its arguments."""

    def __init__(self, args: Sequence[Any]):
        self.env: dict[fx.Node, Any] = {}
        self.position = 0
        self.args = iter(args)


class GraphRunner:
    """Runs ``root``'s graph node by node (``torch.fx.Interpreter`` semantics: the same calls as its forward)."""

    def __init__(self, root: fx.GraphModule):
        self.root = root
        self.nodes = list(root.graph.nodes)
        self.index = {node: i for i, node in enumerate(self.nodes)}
        # A value is dropped once the last node reading it has run (values nothing reads: at once).
        self.last_use = {node: max([self.index[u] for u in node.users], default=i) for i, node in enumerate(self.nodes)}
        self.interpreter = fx.Interpreter(root, garbage_collect_values=False)
        # {node: the last node index changing its value (or an alias of it) in place}, from ``inspect``.
        self.mutated: dict[fx.Node, int] = {}

    @property
    def copies(self) -> bool:
        """Whether some node changes a value in place (a suffix after it copies what it changes)."""
        return bool(self.mutated)

    def start(self, batch: Sequence[torch.Tensor]) -> Frontier:
        """A run of the original on ``batch``, before its first node."""
        return Frontier(self.root.graph.process_inputs(*batch))

    def run_node(self, env: dict, node: fx.Node, args: Any = None) -> Any:
        self.interpreter.env = env
        if args is not None:
            self.interpreter.args_iter = args
        return self.interpreter.run_node(node)

    def _drop(self, env: dict, node: fx.Node) -> None:
        """Drop the values of ``env`` (its own, not a base's) that no node after ``node`` reads."""
        here = self.index[node]
        for each in (*node.all_input_nodes, node):
            if self.last_use[each] <= here and dict.__contains__(env, each):
                dict.__delitem__(env, each)

    def place(self, run: Frontier, value: Any) -> None:
        """Store ``value`` as the result of ``run``'s current node and move past it."""
        node = self.nodes[run.position]
        run.env[node] = value
        self._drop(run.env, node)
        run.position += 1

    def advance(self, run: Frontier, stop: int) -> None:
        """Run the original's nodes up to (not including) index ``stop``."""
        while run.position < stop:
            self.place(run, self.run_node(run.env, self.nodes[run.position], run.args))

    def call_args(self, run: Frontier, node: fx.Node) -> tuple[tuple, dict]:
        """The arguments ``node`` is called with in ``run``."""
        self.interpreter.env = run.env
        return self.interpreter.fetch_args_kwargs_from_env(node)

    def suffix(self, run: Frontier, node: fx.Node, value: Any) -> Any:
        """The network's output when ``node`` (``run``'s current node) gives ``value`` and the nodes after it
        run from ``run``'s frontier; the frontier is left unchanged."""
        here = self.index[node]
        env = _Overlay(run.env, {n for n, last in self.mutated.items() if last > here})
        env[node] = value
        self._drop(env, node)
        for later in self.nodes[self.index[node] + 1:]:
            env[later] = self.run_node(env, later)
            if later.op == "output":
                return self.root.graph.process_outputs(env[later])
            self._drop(env, later)
        raise ValueError("the graph has no output node")

    def inspect(self, batch: Sequence[torch.Tensor], first: int, last: int) -> int:
        """Run the original on ``batch``: returns the most bytes a probe at nodes ``first`` to ``last`` holds
        beyond a plain run (the live values, and the copies its suffix makes of those changed in place after
        it), and records in ``mutated`` which values nodes change in place (``suffix`` copies those)."""
        run = self.start(batch)
        live: list[dict[int, tuple[int, set[fx.Node]]]] = []  # per position: {storage: (bytes, nodes)}
        while run.position < len(self.nodes):
            node = self.nodes[run.position]
            storages: dict[int, tuple[int, set[fx.Node]]] = {}
            for n, v in run.env.items():
                if n.op == "get_attr":
                    continue
                for t in _tensors(v):
                    storage = t.untyped_storage()
                    storages.setdefault(storage.data_ptr(), (storage.nbytes(), set()))[1].add(n)
            live.append(storages)
            inputs = [(arg, t) for arg in node.all_input_nodes for t in _tensors(run.env[arg])]
            versions = [t._version for _, t in inputs]
            position = run.position
            self.advance(run, run.position + 1)
            for (arg, t), version in zip(inputs, versions):
                if t._version != version:  # every live value sharing the storage changed with it
                    for n in live[position].get(t.untyped_storage().data_ptr(), (0, {arg}))[1] | {arg}:
                        self.mutated[n] = position
        peak = 0
        for position in range(first, min(last, len(live) - 1) + 1):
            held = sum(size for size, _ in live[position].values())
            copied = sum(size for size, nodes in live[position].values()
                         if any(self.mutated.get(n, -1) > position for n in nodes))
            peak = max(peak, held + copied)
        return peak


class _Overlay(dict):
    """A suffix's values over the frontier's: reads fall through to ``base``; a value of ``copied`` nodes is read
    as a copy (one per storage, its views rebuilt on it), so the suffix's in-place ops leave ``base`` as it was."""

    def __init__(self, base: dict, copied: set[fx.Node]):
        super().__init__()
        self.base = base
        self.copied = copied
        self.storages: dict[int, torch.UntypedStorage] = {}

    def __contains__(self, node: object) -> bool:
        return dict.__contains__(self, node) or node in self.base

    def __missing__(self, node: fx.Node) -> Any:
        value = self.base[node]
        if node in self.copied and node.op != "get_attr":
            value = tree_map(self._copy, value)
            self[node] = value
        return value

    def _copy(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        storage = t.untyped_storage()
        copy = self.storages.get(storage.data_ptr())
        if copy is None:
            copy = self.storages[storage.data_ptr()] = storage.clone()
        return t.new_empty(0).set_(copy, t.storage_offset(), t.size(), t.stride())
