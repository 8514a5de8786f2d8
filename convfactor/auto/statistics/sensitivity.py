"""Layer sensitivities: how much of a layer's output error reaches the network output.

A probe replacement is swapped in for one layer at a time, and the network output's relative squared error
is divided by the layer output's: errors then add up, to first order, as sum_l sensitivity_l * error2_l.

In a traced network (``torch.fx.GraphModule``) the original runs once per batch and each probe runs only
the graph after its layer, from the values live across that layer (``convfactor.auto.statistics.suffix``),
instead of the whole network once per probe. What a probe holds beyond a plain run (the frontier, and
copies of the values its suffix changes in place) is measured on one sample; a batch over
``BATCH_FRONTIER_BYTES`` is cut into pieces under it (the original's outputs of each piece computed once
more), and the frontiers of as many pieces as fit ``FRONTIER_BYTES`` are held at once, the rest taken in
chunks, each chunk run once by the original. Layers a suffix cannot probe (an untraced network; a layer
called at several places) get the whole network per probe, with a forward hook swapping the probe's output
in. Both give the same sums in the same order where no batch is cut (a cut batch adds its pieces' sums:
the same to float32 rounding of the outputs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import fx, nn

from ...batches import output_leaves
from ...progress import track
from .suffix import FRONTIER_BYTES, GraphRunner, probe_nodes

__all__ = ["layer_sensitivities", "BATCH_FRONTIER_BYTES"]

BATCH_FRONTIER_BYTES = 64 * 2**20  # what one batch's probe may hold beyond a plain run; larger ones are cut


def _without_bias(layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
    if layer.bias is None:
        return out
    if isinstance(layer, nn.Linear):
        return out - layer.bias
    return out - layer.bias.reshape(1, -1, *([1] * (out.dim() - 2)))


class _Totals:
    """One probe's running sums: the layer's error and signal, the network output's error."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.error = self.signal = self.output_error = 0.0

    def add_layer(self, out: torch.Tensor, new: torch.Tensor) -> None:
        self.error += float(((new - out).double() ** 2).sum())
        self.signal += float((_without_bias(self.layer, out).double() ** 2).sum())

    def add_output(self, new_outs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]) -> None:
        self.output_error += sum(float(((a - b).double() ** 2).sum()) for a, b in zip(new_outs, outs))

    def result(self, signal: float) -> dict[str, float]:
        layer_error2 = self.error / self.signal if self.signal > 0 else 0.0
        output_error2 = self.output_error / signal if signal > 0 else 0.0
        return {"layer_error2": layer_error2, "output_error2": output_error2,
                "sensitivity": output_error2 / layer_error2 if layer_error2 > 0 else 0.0}


@torch.no_grad()
def layer_sensitivities(
    root: nn.Module,
    layers: Mapping[str, nn.Module],
    probes: Mapping[str, nn.Module],
    batches: Sequence[tuple[torch.Tensor, ...]],
    progress: bool = False,
    reference: Sequence[Sequence[torch.Tensor]] | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict[str, dict[str, float]]:
    """Network-output error caused by each probe replacement alone, relative to the layer's own error.

    Args:
        root: the network.
        layers: {name: layer in root}.
        probes: {name: module to run instead of that layer} (same input and output shapes).
        batches: input tuples.
        reference: the network's ``output_leaves`` per batch, when already known (else computed).
        stop: asked before each probe (each probe of a chunk of batches, when the batches' frontiers do not
            fit ``FRONTIER_BYTES`` at once); True ends the probing (the layers not probed on every batch are
            left out).
    Returns:
        {name: {"layer_error2": E||y' - y||^2 / E||y - b||^2, "output_error2": the same for the
        network's outputs, "sensitivity": their ratio}} (sensitivity 0 when the probe is exact), in
        ``probes``' order.
    """
    if reference is None:
        reference = [output_leaves(root(*batch)) for batch in batches]
    batches = list(batches)[:len(reference)]
    signal = sum(float((t.double() ** 2).sum()) for outs in reference for t in outs)
    stop = stop or (lambda: False)
    nodes = probe_nodes(root, {name: layers[name] for name in probes})
    totals = _suffix_probes(root, nodes, layers, probes, batches, reference, progress, stop) if nodes else {}
    rest = {name: probe for name, probe in probes.items() if name not in nodes}
    if len(totals) == len(nodes) and rest:
        totals.update(_whole_network_probes(root, layers, rest, batches, reference, progress, stop))
    return {name: totals[name].result(signal) for name in probes if name in totals}


def _whole_network_probes(root: nn.Module, layers: Mapping[str, nn.Module], probes: Mapping[str, nn.Module],
                          batches: Sequence, reference: Sequence, progress: bool,
                          stop: Callable[[], bool]) -> dict[str, _Totals]:
    """Each probe swapped in by a forward hook while the whole network runs on every batch."""
    result: dict[str, _Totals] = {}
    for name, probe in track(list(probes.items()), progress, "sensitivities"):
        if stop():
            break
        totals = _Totals(layers[name])

        def hook(module, args, out, probe=probe, totals=totals):
            new = probe(args[0])
            totals.add_layer(out, new)
            return new

        handle = layers[name].register_forward_hook(hook)
        try:
            for batch, outs in zip(batches, reference):
                totals.add_output(output_leaves(root(*batch)), outs)
        finally:
            handle.remove()
        result[name] = totals
    return result


def _pieces(root: nn.Module, batches: Sequence, reference: Sequence, per_sample: float) -> tuple[list, list]:
    """The batches, each one whose probe would hold over BATCH_FRONTIER_BYTES cut into consecutive pieces under
    it (at least one sample each), with the original's outputs of each piece (computed here for cut ones)."""
    size = max(1, int(BATCH_FRONTIER_BYTES // max(per_sample, 1.0)))
    pieces, outputs = [], []
    for batch, outs in zip(batches, reference):
        count = len(batch[0])
        if count <= size:
            pieces.append(batch)
            outputs.append(outs)
            continue
        for start in range(0, count, size):
            piece = tuple(t[start:start + size] for t in batch)
            pieces.append(piece)
            outputs.append(output_leaves(root(*piece)))
    return pieces, outputs


def _chunks(batches: Sequence, per_sample: float) -> list[list[int]]:
    """Batch indices in consecutive chunks whose probes' frontiers fit FRONTIER_BYTES together (at least one
    batch each)."""
    chunks: list[list[int]] = [[]]
    held = 0.0
    for index, batch in enumerate(batches):
        size = per_sample * len(batch[0])
        if chunks[-1] and held + size > FRONTIER_BYTES:
            chunks.append([])
            held = 0.0
        chunks[-1].append(index)
        held += size
    return chunks


def _suffix_probes(root: fx.GraphModule, nodes: Mapping[str, fx.Node], layers: Mapping[str, nn.Module],
                   probes: Mapping[str, nn.Module], batches: Sequence, reference: Sequence, progress: bool,
                   stop: Callable[[], bool]) -> dict[str, _Totals]:
    """Each probe run on the graph after its layer, from the frontier of the original's one run per batch
    (batches cut into pieces and taken in chunks to bound the frontiers held: ``_pieces``, ``_chunks``)."""
    runner = GraphRunner(root)
    order = sorted(nodes, key=lambda name: runner.index[nodes[name]])
    first, last = runner.index[nodes[order[0]]], runner.index[nodes[order[-1]]]
    per_sample = runner.inspect(tuple(t[:1] for t in batches[0]), first, last) if batches else 0
    batches, reference = _pieces(root, batches, reference, per_sample)
    chunks = _chunks(batches, per_sample)
    totals = {name: _Totals(layers[name]) for name in order}
    steps = [(chunk, name) for chunk in chunks for name in order]
    runs: dict[int, object] = {}
    done = 0
    for chunk, name in track(steps, progress, "sensitivities", unit="probe" if len(chunks) > 1 else "layer"):
        if stop():
            break
        if name == order[0]:
            runs = {index: runner.start(batches[index]) for index in chunk}
        node = nodes[name]
        for index in chunk:
            run = runs[index]
            runner.advance(run, runner.index[node])
            args, kwargs = runner.call_args(run, node)
            out = layers[name](*args, **kwargs)
            new = probes[name](args[0])
            totals[name].add_layer(out, new)
            totals[name].add_output(output_leaves(runner.suffix(run, node, new)), reference[index])
            runner.place(run, out)
        done += 1
    # A layer counts only once probed on every batch, i.e. in the last chunk.
    complete = max(0, done - (len(chunks) - 1) * len(order))
    return {name: totals[name] for name in order[:complete]}
