"""Reading checkpoints and resolving --arch: every accepted form, every rejected one with its message."""

import pickle
import sys
import textwrap

import pytest
import torch
from torch import nn

import convfactor
from convfactor.errors import CheckpointError, ConvfactorError
from convfactor.files.architecture import parse_arch_kwargs, parse_input_shape, resolve_arch
from convfactor.files.checkpoint import check_finite, extract_state_dict, load_weights, read_checkpoint
from convfactor.files.exported_program import lift_exported_module
from tests.cli_models import LinearBNNet, TinyNet, randomized
from tests.nets import TinyMobileNet, TinyResNet, randomize_batchnorm

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def net():
    return randomized(TinyNet())


# -- input shape and --arch-args --------------------------------------------------------------------
@pytest.mark.parametrize("text, shape", [("1,3,224,224", (1, 3, 224, 224)), ("[1, 3, 8, 8]", (1, 3, 8, 8)),
                                         (" (2, 16) ", (2, 16)), (None, None)])
def test_parse_input_shape(text, shape):
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["", "a,b", "1,0,3", "1,-3", "1.5,3", "1,3,x", "1,,3", "x1"])
def test_parse_input_shape_rejects(text):
    with pytest.raises(ConvfactorError, match="--input-shape"):
        parse_input_shape(text)


def test_parse_input_shape_refuses_x_separators_with_the_comma_form():
    with pytest.raises(ConvfactorError, match=r"got '1x3x8x8' \(did you mean 1,3,8,8\?\)"):
        parse_input_shape("1x3x8x8")


def test_parse_arch_kwargs():
    assert parse_arch_kwargs('{"width": 4}') == {"width": 4}
    assert parse_arch_kwargs(None) == {}
    with pytest.raises(ConvfactorError, match="not valid JSON"):
        parse_arch_kwargs("{width: 4}")
    with pytest.raises(ConvfactorError, match="JSON object"):
        parse_arch_kwargs("[4]")


# -- --arch -----------------------------------------------------------------------------------------
def test_resolve_arch_module_and_kwargs():
    arch = resolve_arch("tests.cli_models:tiny_net", {"width": 4})
    model = arch.build()
    assert isinstance(model, TinyNet) and model.conv1.out_channels == 4
    assert arch.to_dict() == {"factory": "tests.cli_models:tiny_net", "kwargs": {"width": 4}}
    assert arch.input_shape is None


def test_resolve_arch_declared_and_zoo_input_shapes():
    assert resolve_arch("tests.cli_models:tiny_net_with_shape").input_shape == (1, 3, 8, 8)
    assert resolve_arch("convfactor.zoo.resnet:resnet20").input_shape == (1, 3, 32, 32)
    assert resolve_arch("convfactor.zoo.resnet:resnet20", {"in_channels": 1}).input_shape == (1, 1, 32, 32)


def test_resolve_arch_from_file_imports_neighbours(tmp_path):
    (tmp_path / "helper.py").write_text("WIDTH = 5\n")
    (tmp_path / "net.py").write_text(textwrap.dedent("""
        from torch import nn
        import helper

        def build(classes=3):
            return nn.Linear(helper.WIDTH, classes)
    """))
    arch = resolve_arch(f"{tmp_path / 'net.py'}:build", {"classes": 2})
    assert arch.factory == f"{(tmp_path / 'net.py').resolve()}:build"
    assert arch.build().weight.shape == (2, 5)


@pytest.mark.parametrize("spec, message", [
    ("tests.cli_models", "must look like"),
    ("no_such_module_xyz:build", "no module named 'no_such_module_xyz'"),
    ("tests.cli_models:missing", "has no attribute 'missing'"),
    ("tests.cli_models:__all__", "not a callable"),
    ("/nonexistent/dir/net.py:build", "not found"),
])
def test_resolve_arch_rejects(spec, message):
    with pytest.raises(ConvfactorError, match=message):
        resolve_arch(spec)


def test_arch_build_errors_are_one_line():
    with pytest.raises(ConvfactorError, match="returned dict, not a torch.nn.Module"):
        resolve_arch("tests.cli_models:not_a_module").build()
    with pytest.raises(ConvfactorError, match="raised RuntimeError: cannot build this model"):
        resolve_arch("tests.cli_models:raising_factory").build()
    with pytest.raises(ConvfactorError, match="calling it with"):
        resolve_arch("tests.cli_models:tiny_net", {"depth": 3}).build()


def test_file_with_syntax_error(tmp_path):
    (tmp_path / "broken.py").write_text("def build(:\n")
    with pytest.raises(ConvfactorError, match="importing broken.py failed with SyntaxError"):
        resolve_arch(f"{tmp_path / 'broken.py'}:build")


# -- state dicts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [None, "state_dict", "model", "model_state_dict", "net"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod."])
def test_extract_state_dict_nesting_and_prefixes(net, key, prefix):
    original = net.state_dict()
    state = {prefix + k: v for k, v in original.items()}
    content = state if key is None else {key: state, "epoch": 7, "optimizer": {"lr": 0.1}}
    found, notes = extract_state_dict(content)
    assert list(found) == list(original)
    assert all(found[k] is v for k, v in original.items())
    assert (key is not None) == any("nested" in n for n in notes)
    assert bool(prefix) == any("prefix" in n for n in notes)


def test_extract_state_dict_rejects_other_content():
    with pytest.raises(CheckpointError, match="does not hold a state_dict.*'epoch'"):
        extract_state_dict({"epoch": 3, "lr": 0.1})
    with pytest.raises(CheckpointError, match="found a list"):
        extract_state_dict([torch.zeros(1)])


def test_load_weights_lists_first_mismatches(net):
    wide = TinyNet(width=16)
    with pytest.raises(CheckpointError) as error:
        load_weights(wide, net.state_dict())
    message = str(error.value)
    assert "shape mismatch (file vs model)" in message and "conv1.weight [8, 3, 3, 3] vs [16, 3, 3, 3]" in message
    assert "(+" in message and "\n" not in message  # only the first few, one line
    state = dict(net.state_dict())
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 missing: fc\.bias; 1 unexpected: extra\.weight"):
        load_weights(TinyNet(), state)


def test_check_finite_names_the_tensor(net):
    broken = TinyNet()
    broken.load_state_dict(net.state_dict())
    with torch.no_grad():
        broken.conv2.weight[0, 0, 0, 0] = float("nan")
        broken.bn1.running_var[1] = float("inf")
    with pytest.raises(CheckpointError, match=r"conv2\.weight \(1 NaN, 0 Inf\).*bn1\.running_var \(0 NaN, 1 Inf\)"):
        check_finite(broken)
    check_finite(net)  # no error


# -- reading files ----------------------------------------------------------------------------------
def test_read_state_dict_file(tmp_path, net):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"module." + k: v for k, v in net.state_dict().items()}, "epoch": 2}, path)
    checkpoint = read_checkpoint(path)
    assert checkpoint.kind == "state_dict" and list(checkpoint.content) == list(net.state_dict())


def test_read_pickled_module_needs_trust(tmp_path, net):
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(CheckpointError, match="references tests.cli_models.TinyNet.*--trust-checkpoint"):
        read_checkpoint(path)
    checkpoint = read_checkpoint(path, trust=True)
    assert checkpoint.kind == "module" and torch.equal(checkpoint.content(X), net(X))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "directory", "missing"])
def test_read_damaged_files(tmp_path, net, damage):
    path = tmp_path / "ckpt.pt"
    torch.save(net.state_dict(), path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x80\x04definitely not a checkpoint" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "directory":
        path.unlink()
        path.mkdir()
    else:
        path.unlink()
    expected = {"truncated": "corrupt or truncated", "garbage": "corrupt or truncated", "empty": "is empty",
                "directory": "is a directory", "missing": "not found"}[damage]
    with pytest.raises(CheckpointError, match=expected):
        read_checkpoint(path)


def test_read_truncated_exported_program(tmp_path, exported):
    model, path = exported("tiny")
    damaged = tmp_path / "damaged.pt2"
    damaged.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read exported program"):
        read_checkpoint(damaged)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_error_is_not_reported_as_a_trust_problem(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(pickle.dumps({"a": 1})[:-3])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint(path, trust=True)


# -- torch.export programs --------------------------------------------------------------------------
_BUILDERS = {
    "tiny": lambda: randomized(TinyNet()),
    "resnet": lambda: randomize_batchnorm(TinyResNet(width=8)),
    "mobile": lambda: randomize_batchnorm(TinyMobileNet()),
    "linear_bn": lambda: randomized(LinearBNNet()),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model, .pt2 path of its batch-1 export); each model exported once (export is slow)."""
    cache = {}

    def get(name):
        if name not in cache:
            model = _BUILDERS[name]()
            path = tmp_path_factory.mktemp("exported") / f"{name}.pt2"
            torch.export.save(torch.export.export(model, (X[:1],)), path)
            cache[name] = (model, path)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(_BUILDERS))
def test_lift_exported_module_restores_layer_modules(exported, name):
    model, path = exported(name)
    lifted = lift_exported_module(read_checkpoint(path).content)
    assert torch.equal(lifted(X[:1]), model(X[:1]))
    assert lifted(X).shape[0] == 2  # the batch-1 guards were dropped
    kinds = {name: type(m) for name, m in model.named_modules()
             if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d))}
    assert {name: type(lifted.get_submodule(name)) for name in kinds} == kinds
    assert set(lifted.state_dict()) == set(model.state_dict())


def test_lifted_program_factorizes_exactly_at_full_rank(exported):
    model, path = exported("resnet")
    lifted = lift_exported_module(read_checkpoint(path).content)
    fast = convfactor.factorize(lifted, "spatial_svd:1.0", X[:1])
    report = convfactor.get_report(fast)
    eager = convfactor.get_report(convfactor.factorize(model, "spatial_svd:1.0", X[:1]))
    assert report.folded == eager.folded and len(report.folded) == 10  # every conv -> BatchNorm pair
    assert [d.name for d in report.replaced] == [d.name for d in eager.replaced] and len(report.replaced) == 10
    with torch.no_grad():
        expected = model(X)
        assert float((fast(X) - expected).norm() / expected.norm()) <= 1e-5


def test_functional_conv_on_a_shared_weight_is_left_alone(tmp_path):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(self.conv(x))

    model = Shared().eval()
    path = tmp_path / "shared.pt2"
    torch.export.save(torch.export.export(model, (X,)), path)
    lifted = lift_exported_module(read_checkpoint(path).content)
    assert not any(isinstance(m, nn.Conv2d) for m in lifted.modules())  # two calls read one weight
    assert torch.equal(lifted(X), model(X))


def test_resolve_arch_imports_from_the_working_directory_without_keeping_it_on_sys_path(tmp_path, monkeypatch):
    (tmp_path / "cwd_model_xyz.py").write_text("from torch import nn\n\ndef build():\n    return nn.Linear(2, 3)\n")
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    assert resolve_arch("cwd_model_xyz:build").build().weight.shape == (3, 2)
    assert sys.path == before
