"""What a new user meets on the command line: every message names what was given and what would work."""

import os
import tempfile
from pathlib import Path

import pytest
import torch

from convfactor import inspect_model
from convfactor.cli.inspect_table import format_inspect_table

REPO = Path(__file__).resolve().parents[2]
ARCH = "tests.cli_models:tiny_net"
SHAPE = "1,3,8,8"


def _convert(cli, ckpt, *extra, out=None):
    out = out or ckpt.with_name("fast.pt")
    return cli("convert", ckpt, "--arch", ARCH, "--policy", "spatial_svd:0.5", "--out", out, *extra, "--quiet")


def _one_error_line(err):
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err[len("error: "):].strip()


def _nothing_written(tmp_path, ckpt):
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (ckpt,) if p.parent == tmp_path)


# -- --out ------------------------------------------------------------------------------------------
def test_out_with_an_onnx_suffix_is_refused_and_names_the_onnx_option(cli, tmp_path, ckpt):
    code, _, err = _convert(cli, ckpt, "--input-shape", SHAPE, out=tmp_path / "m.onnx")
    message = _one_error_line(err)
    assert code == 2 and "m.onnx" in message and "--onnx" in message and ".pt" in message
    _nothing_written(tmp_path, ckpt)


@pytest.mark.parametrize("name", ["m.json", "model"])
def test_out_with_another_suffix_is_refused(cli, tmp_path, ckpt, name):
    code, _, err = _convert(cli, ckpt, "--input-shape", SHAPE, out=tmp_path / name)
    message = _one_error_line(err)
    assert code == 2 and name in message and ".pt" in message and ".pt2" in message
    _nothing_written(tmp_path, ckpt)


# -- policy files -----------------------------------------------------------------------------------
def test_yaml_error_keeps_line_and_column(cli, tmp_path, ckpt):
    policy = tmp_path / "bad.yaml"
    policy.write_text("rules:\n  - match: conv1\n    method: [svd\n")
    code, _, err = cli("convert", ckpt, "--arch", ARCH, "--policy", policy, "--out", tmp_path / "f.pt", "--quiet")
    message = _one_error_line(err)
    assert code == 2 and str(policy) in message
    assert "line 3, column 13" in message and "flow sequence" in message and "expected ',' or ']'" in message


# -- input files ------------------------------------------------------------------------------------
def test_corrupt_check_inputs_message_is_whole(cli, tmp_path, ckpt):
    junk = tmp_path / "inputs.pt"
    junk.write_bytes(bytes(range(256)) * 8)
    code, _, err = _convert(cli, ckpt, "--input-shape", SHAPE, "--check", "--check-inputs", junk)
    message = _one_error_line(err)
    assert code == 2 and str(junk) in message and "--check-inputs" in message
    assert "torch.save" in message and ".npy" in message
    assert "In PyTorch 2.6" not in message and "weights_only" not in message  # torch's advice, not ours
    assert message.endswith(")") or message.endswith(".")  # not cut mid-sentence


def test_random_bytes_checkpoint_does_not_suggest_trusting_it(cli, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes((i * 37 + 11) % 256 for i in range(4000)))
    code, _, err = cli("convert", junk, "--arch", ARCH, "--policy", "svd", "--out", tmp_path / "f.pt", "--quiet")
    message = _one_error_line(err)
    assert code == 2 and "corrupt or truncated" in message and str(junk) in message
    assert "--trust-checkpoint" not in message and "Check the documentation" not in message


def test_unwritable_output_location_says_what_failed(cli, tmp_path, ckpt, monkeypatch):
    missing_parent = tmp_path / "locked"
    missing_parent.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # what /proc does: the directory exists, creating fails ENOENT
        if dir is not None and Path(dir) == missing_parent:
            raise FileNotFoundError(2, "No such file or directory")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    code, _, err = _convert(cli, ckpt, "--input-shape", SHAPE, out=missing_parent / "m.pt")
    message = _one_error_line(err)
    assert code == 2 and "not writable" not in message
    assert f"cannot create a file in {missing_parent}" in message and "No such file or directory" in message


# -- --input-shape ----------------------------------------------------------------------------------
def test_input_shape_with_x_separators_is_refused_with_the_comma_form(cli, tmp_path, ckpt):
    code, _, err = _convert(cli, ckpt, "--input-shape", "1x3x8x8")
    message = _one_error_line(err)
    assert code == 2 and "'1x3x8x8'" in message and "1,3,8,8" in message
    _nothing_written(tmp_path, ckpt)


@pytest.mark.parametrize("typed, expected", [
    ("1,3,8", "--input-shape 1,3,8 does not fit the model: its first layer conv1 (Conv2d) takes 4 dimensions"),
    ("1,5,8,8", "--input-shape 1,5,8,8 does not fit the model: its first layer conv1 (Conv2d) takes 3 input "
                "channels, got 5"),
])
def test_input_shape_misfit_echoes_only_what_was_typed(cli, tmp_path, ckpt, typed, expected):
    code, _, err = _convert(cli, ckpt, "--input-shape", typed)
    message = _one_error_line(err)
    assert code == 2 and message.startswith(expected), message
    assert "[1, 1, 3, 8]" not in message and "expected input" not in message


# -- inspect ----------------------------------------------------------------------------------------
def test_inspect_fits_100_columns_and_wide_shows_everything(cli, ckpt):
    code, stdout, err = cli("inspect", ckpt, "--arch", ARCH, "--input-shape", SHAPE)
    assert code == 0, err
    assert max(map(len, stdout.splitlines())) <= 100
    assert "spatial_svd" in stdout and "--wide" in stdout
    code, wide, err = cli("inspect", ckpt, "--arch", ARCH, "--input-shape", SHAPE, "--wide")
    assert code == 0, err
    assert "spatial_svd 25/50/75%" in wide.splitlines()[0] and "stride" in wide.splitlines()[0]


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_cifar"])
def test_inspect_table_of_zoo_models_fits_100_columns(name):
    from convfactor.zoo import MODELS, get_model

    model = get_model(name)
    table = inspect_model(model, torch.zeros(MODELS[name].input_shape), ["spatial_svd", "tucker2", "svd",
                                                                         "depthwise", "cp", "grouped"])
    assert max(map(len, format_inspect_table(table).splitlines())) <= 100
    assert max(map(len, format_inspect_table(table, wide=True).splitlines())) > 100  # the wide form is wider
