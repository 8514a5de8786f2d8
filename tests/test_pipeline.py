"""The pipeline, defined once in convfactor.pipeline: what factorize and load both run."""

import pytest
import torch
from torch import nn

import convfactor
from convfactor.errors import TraceError
from convfactor.pipeline import run_pipeline
from passes import PassFailed, factorize_layers
from tests.nets import TinyResNet, randomize_batchnorm

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _net():
    torch.manual_seed(0)
    return randomize_batchnorm(TinyResNet()).eval()


def test_passes_run_in_order_and_the_rewrite_sees_shapes_and_folded_pairs():
    seen = {}

    def rewrite(root, shapes, folded):
        seen.update(shapes=dict(shapes), folded=list(folded))
        return factorize_layers(root, {})

    done = run_pipeline(_net(), rewrite, example_inputs=(X,))
    assert list(done.results) == ["capture", "annotate_shapes", "fold_batchnorm", "factorize_layers", "cleanup"]
    assert seen["folded"] == done.changes("fold_batchnorm") and seen["folded"]
    assert seen["shapes"]["conv1"][0] == (2, 3, 32, 32)


def test_without_tracing_only_shapes_and_the_rewrite_run():
    done = run_pipeline(_net(), lambda root, shapes, folded: factorize_layers(root, {}), example_inputs=(X,),
                        trace=False)
    assert list(done.results) == ["annotate_shapes", "factorize_layers"]
    assert done.changes("fold_batchnorm") == []


def test_a_bug_in_a_pass_names_it_and_a_user_error_passes_through():
    def broken(root, shapes, folded):
        raise IndexError("off by one")

    with pytest.raises(PassFailed, match=r"pass 'factorize_layers' failed \(passes run before it: capture, "
                                         r"annotate_shapes, fold_batchnorm\): off by one"):
        run_pipeline(_net(), broken, example_inputs=(X,))

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(TraceError, match="torch.fx could not trace Branchy"):
        run_pipeline(Branchy(), broken)


def test_factorize_and_load_agree_through_the_one_pipeline(tmp_path):
    model = _net()
    fast = convfactor.factorize(model, "spatial_svd:0.5", X)
    path = tmp_path / "fast.pt"
    convfactor.save_factorized(fast, path, input_shape=(1, 3, 32, 32))
    again = convfactor.load(path, arch=model)
    with torch.no_grad():
        assert torch.equal(again(X), fast(X))
