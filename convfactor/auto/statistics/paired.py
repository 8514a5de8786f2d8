"""A layer's input in two networks on the same batches, and the paired moments the sequential refit needs.

The sequential refit fits each layer to what the original layer computed, from the input the partially
factorized network now gives it. Its statistics pair the two inputs at the same sampled positions
(``paired_statistics``). Where those inputs come from is a separate job, with two answers:

    PrefixInputs     any network: runs it on the batch until the layer has its input (a forward pre-hook
                     ends the pass). Asked for every layer in turn, that is about half a network pass per
                     layer per batch.
    FrontierInputs   a traced network (``torch.fx.GraphModule``) that calls each layer at one node: one run
                     per batch is advanced node by node (``GraphRunner``) and kept between layers, so all the
                     layers asked for in graph order cost one network pass per batch in all. Its memory is
                     the values live across the current node for every batch at once; ``fits`` says whether
                     that stays within a byte budget, measured on one sample.

Both run the same modules on the same values, so they give the same inputs. A network's modules may be
swapped (``set_submodule``) between requests: a frontier runs each node when it advances past it, with the
module the network holds then.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import fx, nn

from ...geometry import LayerGeometry
from .calibration import KRONECKER_ROWS
from .covariance import Covariance
from .patches import Moments, ProjectedMoments, WeightCross, chunks, patch_extractor, positions, sampled, sampled_rows
from .suffix import GraphRunner, probe_nodes

__all__ = ["paired_statistics", "PrefixInputs", "FrontierInputs", "LayerInput"]

LayerInput = Callable[[str, int, tuple], torch.Tensor]  # (layer name, batch index, batch) -> its input


class _Reached(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has seen its input."""


class PrefixInputs:
    """The input of layer ``name`` of ``net`` on a batch, by running ``net`` until that layer is called."""

    def __init__(self, net: nn.Module):
        self.net = net

    @torch.no_grad()
    def __call__(self, name: str, index: int, batch: tuple) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def hook(module, args):
            captured.append(args[0])
            raise _Reached

        handle = self.net.get_submodule(name).register_forward_pre_hook(hook)
        try:
            self.net(*batch)
        except _Reached:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"the network never called layer {name!r}")
        return captured[0]


class FrontierInputs:
    """The input of each layer of a traced ``net`` on each batch, from one run per batch advanced in graph order.

    Args:
        net: a ``GraphModule``; its submodules may be swapped between requests.
        names: the layers that will be asked for.
        batches: the batches (batch ``index`` of a request refers to this list).
    """

    def __init__(self, net: fx.GraphModule, names: Sequence[str], batches: Sequence[tuple]):
        self.runner = GraphRunner(net)
        self.nodes = probe_nodes(net, {name: net.get_submodule(name) for name in names})
        self.batches = batches
        self.runs: dict[int, object] = {}

    @staticmethod
    def usable(net: nn.Module, names: Sequence[str]) -> bool:
        """Whether ``net`` is traced and calls every layer of ``names`` at one node, in that order."""
        if not isinstance(net, fx.GraphModule):
            return False
        nodes = probe_nodes(net, {name: net.get_submodule(name) for name in names})
        if len(nodes) != len(names):
            return False
        index = {node: i for i, node in enumerate(net.graph.nodes)}
        places = [index[nodes[name]] for name in names]
        return places == sorted(places)

    def frontier_bytes(self) -> int:
        """The most bytes of live values one run of every batch holds at once (from one sample, scaled)."""
        if not self.batches:
            return 0
        one = tuple(t[:1] for t in self.batches[0])
        per_sample = self.runner.inspect(one, 0, len(self.runner.nodes) - 1)
        return per_sample * sum(len(batch[0]) for batch in self.batches)

    @torch.no_grad()
    def __call__(self, name: str, index: int, batch: tuple) -> torch.Tensor:
        node = self.nodes[name]
        run = self.runs.get(index)
        if run is None:
            run = self.runs[index] = self.runner.start(self.batches[index])
        place = self.runner.index[node]
        if run.position > place:
            raise ValueError(f"layer {name!r} asked for after a later layer: a frontier only moves forward")
        self.runner.advance(run, place)
        args, _ = self.runner.call_args(run, node)
        return args[0]


@torch.no_grad()
def paired_statistics(
    layer: nn.Module,
    name: str,
    batches: Sequence[tuple[torch.Tensor, ...]],
    reference_input: LayerInput,
    work_input: LayerInput,
    max_rows: int,
    seed: int = 0,
    form: str = "full",
    reference_inputs: dict[int, torch.Tensor] | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[Covariance, Covariance | WeightCross]:
    """Moments of one layer's input patches in two networks on the same batches.

    ``reference_input`` gives the layer's input in the original network, ``work_input`` in the partially
    factorized one (``PrefixInputs`` or ``FrontierInputs``). The same positions are sampled in both.
    ``reference_inputs`` ({batch index: the layer's input in the original}) is read where it has a batch
    and filled where not, so that a later call for the same layer and batches asks only ``work_input``.

    Returns:
        sigma: E[p_w p_w^T] of the patches the work network feeds the layer, in ``form``;
        cross: E[p_w p_r^T] between them and the original network's patches, in the same form; given the
            layer's ``weight`` W (g, O, D), in the full form and when 2 O < D, ``WeightCross`` W E[p_r p_w^T]
            instead (all the refit reads of it: 2 O D products per row, not D^2).
    """
    extract = patch_extractor(layer)
    geo = LayerGeometry.of(layer)
    kernel = 1 if geo.kind == "Linear" else geo.kernel_volume
    channels = geo.in_channels // geo.groups
    generator = torch.Generator().manual_seed(seed)
    limit = min(max_rows, KRONECKER_ROWS) if form == "kronecker" else max_rows
    per_batch = max(1, math.ceil(limit / len(batches)))
    sigma = Moments(form, geo.groups, channels, kernel)
    project = weight is not None and form == "full" and ProjectedMoments.projects(weight.shape[1], weight.shape[2])
    cross = ProjectedMoments(weight.to(layer.weight.dtype)) if project else Moments(form, geo.groups, channels, kernel)
    for index, batch in enumerate(batches):
        x_ref = None if reference_inputs is None else reference_inputs.get(index)
        if x_ref is None:
            x_ref = reference_input(name, index, batch)
            if reference_inputs is not None:
                reference_inputs[index] = x_ref
        x_work = work_input(name, index, batch)
        if form == "kronecker":
            v_ref = positions(x_ref.to(layer.weight.dtype), geo.groups)
            v_work = positions(x_work.to(layer.weight.dtype), geo.groups)
            keep = sampled(v_ref[0], max_rows // len(batches) + 1, generator)
            if keep is not None:
                v_ref, v_work = v_ref[:, keep], v_work[:, keep]
            sigma.add_channels(v_work, v_work)
            cross.add_channels(v_work, v_ref)
        for c_ref, c_work in zip(chunks(x_ref, layer), chunks(x_work, layer)):
            keep = sampled_rows(extract.positions(c_ref), max(1, math.ceil(per_batch * len(c_ref) / len(x_ref))),
                                generator, c_ref.device)
            p_ref, p_work = extract(c_ref, keep), extract(c_work, keep)
            p_ref = p_ref.reshape(p_ref.shape[0], geo.groups, -1).transpose(0, 1)
            p_work = p_work.reshape(p_work.shape[0], geo.groups, -1).transpose(0, 1)
            sigma.add(p_work, p_work)
            cross.add(p_work, p_ref)
    return sigma.result(), cross.result()

