"""save_factorized / load / apply_plan: reloaded models compute bit-identical outputs; bad files are rejected."""

import os
import sys

import pytest
import torch
from torch import nn

import convfactor
from convfactor.errors import CheckpointError, ConvfactorError
from convfactor.files.serialize import (
    FORMAT,
    apply_plan,
    factorized_payload,
    load,
    save_exported,
    save_factorized,
)
from tests.cli_models import GatedNet, LinearBNNet, TinyNet, randomized
from tests.nets import TinyMobileNet, TinyResNet, randomize_batchnorm

X = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
MIXED_POLICY = {"rules": [{"types": ["Linear"], "method": "svd", "rank": 2},
                          {"match": "conv1", "method": "skip"},
                          {"types": ["Conv2d"], "method": "tucker2", "rank": 0.5}]}

CASES = {
    # name: (factory spec, builder, policy, factorize options)
    "tiny-svd": ("tests.cli_models:tiny_net", lambda: randomized(TinyNet()), "spatial_svd:0.5", {}),
    "tiny-mixed": ("tests.cli_models:tiny_net", lambda: randomized(TinyNet()), MIXED_POLICY, {}),
    "tiny-no-fold": ("tests.cli_models:tiny_net", lambda: randomized(TinyNet()), "spatial_svd:0.5",
                     {"fold_batchnorm": False}),
    "tiny-no-trace": ("tests.cli_models:tiny_net", lambda: randomized(TinyNet()), "spatial_svd:0.5",
                      {"trace": False}),
    "linear-bn": ("tests.cli_models:linear_bn_net", lambda: randomized(LinearBNNet()), "svd:0.5", {}),
    "gated-leaf": ("tests.cli_models:gated_net", lambda: randomized(GatedNet()), "spatial_svd:0.5",
                   {"leaf_modules": ["Gate"]}),
    "resnet-cp": ("tests.nets:TinyResNet", lambda: randomize_batchnorm(TinyResNet(width=8)),
                  {"rules": [{"match": "layer2.1.conv1", "method": "cp", "rank": 4}]}, {}),
    "mobilenet": ("tests.nets:TinyMobileNet", lambda: randomize_batchnorm(TinyMobileNet()), "spatial_svd:0.5", {}),
}


def _save_and_load(tmp_path, case, name="fast.pt"):
    factory, build, policy, options = CASES[case]
    model = build()
    fast = convfactor.factorize(model, policy, X[:1], **options)
    path = tmp_path / name
    kwargs = {"width": 8} if factory == "tests.nets:TinyResNet" else {}
    save_factorized(fast, path, arch={"factory": factory, "kwargs": kwargs},
                    leaf_modules=options.get("leaf_modules", ()))
    return model, fast, path


@pytest.mark.parametrize("case", list(CASES))
def test_reloaded_output_is_bit_identical(tmp_path, case):
    model, fast, path = _save_and_load(tmp_path, case)
    reloaded = load(path, trust_code=True)  # our own test file: its factory may be imported
    assert not reloaded.training
    with torch.no_grad():
        assert torch.equal(reloaded(X), fast(X))
        assert not torch.equal(reloaded(X), model(X))  # it really is the factorized model
    assert convfactor.get_report(reloaded).plan() == convfactor.get_report(fast).plan()


def test_file_holds_only_plain_data_and_tensors(tmp_path):
    _, fast, path = _save_and_load(tmp_path, "tiny-mixed")
    payload = torch.load(path, weights_only=True)  # would raise on any pickled class
    assert payload["format"] == FORMAT
    assert payload["arch"] == {"factory": "tests.cli_models:tiny_net", "kwargs": {}}
    assert payload["input_shape"] == [1, 3, 8, 8]
    assert payload["plan"]["layers"] == {
        "conv2": {"method": "tucker2", "rank": [4, 8]},
        "proj": {"method": "tucker2", "rank": [8, 8]},
        "fc": {"method": "svd", "rank": 2},
    }
    assert set(payload["state_dict"]) == set(fast.state_dict())

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (str, int, float, bool))

    assert plain({k: v for k, v in payload.items() if k != "state_dict"})


def test_arch_override_forms(tmp_path):
    _, fast, path = _save_and_load(tmp_path, "tiny-svd")
    with torch.no_grad():
        expected = fast(X)
        assert torch.equal(load(path, arch="tests.cli_models:tiny_net")(X), expected)
        assert torch.equal(load(path, arch=TinyNet)(X), expected)
        assert torch.equal(load(path, arch=TinyNet())(X), expected)  # an instance: its weights do not matter


def test_wrong_architecture_is_rejected(tmp_path):
    _, _, path = _save_and_load(tmp_path, "tiny-svd")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load(path, arch_kwargs={"width": 16}, trust_code=True)
    with pytest.raises(CheckpointError, match="BatchNorm folding differs"):
        load(path, arch=lambda: nn.Sequential(nn.Conv2d(3, 8, 3)))
    _, _, path = _save_and_load(tmp_path, "tiny-no-fold", "no_fold.pt")
    with pytest.raises(CheckpointError, match="the plan replaces layer 'conv1', which the architecture does not have"):
        load(path, arch=lambda: nn.Sequential(nn.Conv2d(3, 8, 3)))


def test_missing_architecture_record(tmp_path):
    fast = convfactor.factorize(randomized(TinyNet()), "spatial_svd:0.5", X[:1])
    save_factorized(fast, tmp_path / "anonymous.pt")
    with pytest.raises(CheckpointError, match="does not say how to build its architecture; pass arch="):
        load(tmp_path / "anonymous.pt")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "anonymous.pt", arch=TinyNet)(X), fast(X))


def test_load_rejects_files_that_are_not_factorized(tmp_path):
    torch.save(TinyNet().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a factorized convfactor checkpoint.*state_dict"):
        load(tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "nothing.pt")


def test_future_format_is_named(tmp_path):
    torch.save({"format": "convfactor/9", "state_dict": {}}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format 'convfactor/9'.*upgrade"):
        load(tmp_path / "future.pt")


def test_non_finite_saved_weights_are_rejected(tmp_path):
    _, _, path = _save_and_load(tmp_path, "tiny-svd")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["fc.weight"][0, 0] = float("nan")
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"non-finite weights: fc\.weight \(1 NaN"):
        load(path, trust_code=True)


def test_apply_plan_gives_structure_only():
    model = randomized(TinyNet())
    fast = convfactor.factorize(model, MIXED_POLICY, X[:1])
    shell = apply_plan(TinyNet(), convfactor.get_report(fast).plan())
    assert {k: v.shape for k, v in shell.state_dict().items()} == {k: v.shape for k, v in fast.state_dict().items()}
    assert [type(m).__name__ for m in shell.modules()] == [type(m).__name__ for m in fast.modules()]


def test_apply_plan_detects_different_batchnorm_folding():
    fast = convfactor.factorize(randomized(TinyNet()), "spatial_svd:0.5", X[:1])
    with pytest.raises(CheckpointError, match="BatchNorm folding differs"):
        apply_plan(TinyNet(), convfactor.get_report(fast).plan(), expected_folded=[["conv2", "bn2"]])


def test_apply_plan_rejects_malformed_plans():
    with pytest.raises(CheckpointError, match="not a convfactor plan"):
        apply_plan(TinyNet(), {"layers": {}})
    with pytest.raises(CheckpointError, match="needs a method name and a rank"):
        apply_plan(TinyNet(), {"format": "convfactor-plan/1", "capture": "fx", "layers": {"conv1": {}}})


def test_payload_needs_a_factorized_model():
    with pytest.raises(ConvfactorError, match="not produced by convfactor.factorize"):
        factorized_payload(TinyNet())


def test_exported_program_output(tmp_path):
    fast = convfactor.factorize(randomized(TinyNet()), "spatial_svd:0.5", X[:1])
    save_exported(fast, X[:1], tmp_path / "fast.pt2")
    program = torch.export.load(tmp_path / "fast.pt2")
    with torch.no_grad():
        torch.testing.assert_close(program.module()(X[:1]), fast(X[:1]), rtol=1e-6, atol=1e-6)


def test_failed_write_leaves_no_file_and_no_temp(tmp_path, monkeypatch):
    _, fast, _ = _save_and_load(tmp_path, "tiny-svd")
    before = set(os.listdir(tmp_path))
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:
            handle.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_factorized(fast, tmp_path / "never.pt", arch="tests.cli_models:tiny_net")
    assert set(os.listdir(tmp_path)) == before


def test_existing_file_needs_force(tmp_path):
    _, fast, path = _save_and_load(tmp_path, "tiny-svd")
    with pytest.raises(ConvfactorError, match="exists"):
        save_factorized(fast, path)
    save_factorized(fast, path, arch="tests.cli_models:tiny_net", force=True)
    assert isinstance(load(path, trust_code=True), nn.Module)


# -- a file never chooses code to run ---------------------------------------------------------------
def _malicious_file(tmp_path):
    """A factorized checkpoint whose stored factory would run a shell command if it were ever called."""
    marker = tmp_path / "pwned"
    fast = convfactor.factorize(randomized(TinyNet()), "spatial_svd:0.5", X[:1])
    payload = factorized_payload(fast, arch={"factory": "subprocess:getoutput",
                                             "kwargs": {"cmd": f"touch {marker}"}})
    torch.save(payload, tmp_path / "evil.pt")
    return tmp_path / "evil.pt", marker


def test_a_file_naming_code_runs_nothing(tmp_path, monkeypatch):
    path, marker = _malicious_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    with pytest.raises(CheckpointError) as caught:
        load(path)
    message = str(caught.value)
    assert not marker.exists()
    assert "\n" not in message
    assert "'subprocess:getoutput'" in message and "arch=" in message and "trust_code=True" in message
    assert sys.path == path_before  # the working directory was not put on sys.path


def test_a_stored_factory_runs_only_when_trusted(tmp_path):
    _, fast, path = _save_and_load(tmp_path, "tiny-svd")
    with pytest.raises(CheckpointError, match="'tests.cli_models:tiny_net'"):
        load(path)
    with pytest.raises(CheckpointError, match="'tests.cli_models:tiny_net'"):
        load(path, arch_kwargs={"width": 8})  # new kwargs do not make the stored factory trusted
    with torch.no_grad():
        assert torch.equal(load(path, trust_code=True)(X), fast(X))
        assert torch.equal(load(path, arch="tests.cli_models:tiny_net")(X), fast(X))


def test_builtin_zoo_factories_need_no_trust(tmp_path):
    from convfactor.zoo import get_model

    fast = convfactor.factorize(get_model("resnet20"), "spatial_svd:0.5", torch.randn(1, 3, 32, 32))
    save_factorized(fast, tmp_path / "zoo.pt", arch="convfactor.zoo.resnet:resnet20")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "zoo.pt")(x), fast(x))
