"""The bad-input matrix: every mistake a user can make gets one ``error:`` line naming the flag, exit 2, no file.

Each CLI case runs ``convfactor.cli.main`` in-process on the tiny ``tests.cli_models:tiny_net``; every
check it exercises comes before the factorization, so the whole file runs in seconds. The API twins
feed the same mistakes to ``factorize`` and expect a one-line ``ConvfactorError`` naming the argument,
with the caller's model unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import convfactor
from convfactor.auto import AutoOptions
from convfactor.errors import ConvfactorError, InputSpecError
from convfactor.input_checks import check_inputs
from tests.cli_models import TinyNet, randomized

ARCH = "tests.cli_models:tiny_net"
SHAPE = "1,3,8,8"


def _tensor(*shape, dtype=torch.float32, fill=None):
    def write(path: Path) -> None:
        t = torch.randn(shape).to(dtype) if fill is None else torch.full(shape, fill, dtype=dtype)
        torch.save(t, path)
    return write


def _npy(*shape):
    return lambda path: np.save(path, np.random.default_rng(0).standard_normal(shape).astype(np.float32))


def _obj(value):
    return lambda path: torch.save(value, path)


def _text(text):
    return lambda path: path.write_text(text)


def _nan_checkpoint(path: Path) -> None:
    state = randomized(TinyNet()).state_dict()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, path)


# id: (files to create in tmp_path {name: writer}, extra convert arguments, what the error line must contain)
# The base command is: convert net.pt --arch tiny_net --input-shape 1,3,8,8 --policy spatial_svd:0.5
# --out fast.pt; a case's arguments come after it (argparse keeps the last value of a repeated option).
CONVERT_CASES = {
    # --calibration: the data must fit the model
    "calibration 1 channel": ({"c.pt": _tensor(16, 1, 8, 8)}, ["--calibration", "{c.pt}"], ["--calibration", "c.pt",
                                                                                              "expected 3"]),
    "calibration 2-D": ({"c.pt": _tensor(32, 32)}, ["--calibration", "{c.pt}"], ["--calibration", "expected 4"]),
    "calibration 1-D": ({"c.pt": _tensor(16)}, ["--calibration", "{c.pt}"], ["--calibration", "1 dimensions"]),
    "calibration 5-D": ({"c.pt": _tensor(2, 3, 8, 8, 2)}, ["--calibration", "{c.pt}"], ["--calibration", "expected 4"]),
    "calibration scalar": ({"c.pt": _tensor()}, ["--calibration", "{c.pt}"], ["--calibration", "scalar"]),
    "calibration NHWC npy": ({"c.npy": _npy(16, 8, 8, 3)}, ["--calibration", "{c.npy}"], ["--calibration",
                                                                                           "channels last"]),
    "calibration 0 samples": ({"c.pt": _tensor(0, 3, 8, 8)}, ["--calibration", "{c.pt}"], ["--calibration",
                                                                                            "0 samples"]),
    "calibration NaN": ({"c.pt": _tensor(4, 3, 8, 8, fill=float("nan"))}, ["--calibration", "{c.pt}"],
                        ["--calibration", "NaN or Inf"]),
    "calibration Inf": ({"c.pt": _tensor(4, 3, 8, 8, fill=float("inf"))}, ["--calibration", "{c.pt}"],
                        ["--calibration", "NaN or Inf"]),
    "calibration uint8": ({"c.pt": _tensor(4, 3, 8, 8, dtype=torch.uint8, fill=3)}, ["--calibration", "{c.pt}"],
                          ["--calibration", "uint8", "floating-point"]),
    "calibration bool": ({"c.pt": _tensor(4, 3, 8, 8, dtype=torch.bool, fill=True)}, ["--calibration", "{c.pt}"],
                         ["--calibration", "bool"]),
    "calibration complex": ({"c.pt": _tensor(4, 3, 8, 8, dtype=torch.complex64)}, ["--calibration", "{c.pt}"],
                            ["--calibration", "complex64"]),
    "calibration a dict": ({"c.pt": _obj({"x": torch.zeros(2)})}, ["--calibration", "{c.pt}"],
                           ["--calibration", "got dict"]),
    "calibration a list of text": ({"c.pt": _obj(["a", "b"])}, ["--calibration", "{c.pt}"],
                                   ["--calibration", "got list"]),
    "calibration missing file": ({}, ["--calibration", "{tmp}/none.pt"], ["--calibration", "not found"]),
    "calibration corrupt file": ({"c.pt": _text("not a tensor")}, ["--calibration", "{c.pt}"],
                                 ["--calibration", "cannot read"]),
    "calibration corrupt npy": ({"c.npy": _text("junk")}, ["--calibration", "{c.npy}"],
                                ["--calibration", "cannot read"]),
    # --check-inputs: the same checks, named as --check-inputs
    "check inputs 1 channel": ({"c.pt": _tensor(4, 1, 8, 8)}, ["--check", "--check-inputs", "{c.pt}"],
                               ["--check-inputs", "expected 3"]),
    "check inputs NaN": ({"c.pt": _tensor(4, 3, 8, 8, fill=float("nan"))}, ["--check", "--check-inputs", "{c.pt}"],
                         ["--check-inputs", "NaN"]),
    "check inputs 0 samples": ({"c.pt": _tensor(0, 3, 8, 8)}, ["--check", "--check-inputs", "{c.pt}"],
                               ["--check-inputs", "0 samples"]),
    "check inputs 2-D": ({"c.pt": _tensor(8, 8)}, ["--check", "--check-inputs", "{c.pt}"],
                         ["--check-inputs", "expected 4"]),
    "check inputs int64": ({"c.pt": _tensor(4, 3, 8, 8, dtype=torch.int64, fill=1)},
                           ["--check", "--check-inputs", "{c.pt}"], ["--check-inputs", "int64"]),
    "check inputs missing file": ({}, ["--check", "--check-inputs", "{tmp}/none.pt"], ["--check-inputs",
                                                                                       "not found"]),
    "check inputs without --check": ({"c.pt": _tensor(4, 3, 8, 8)}, ["--check-inputs", "{c.pt}"],
                                     ["--check-inputs", "--check"]),
    # --validation (held-out data): the same checks again, named as --validation
    "validation 1 channel": ({"v.pt": _tensor(8, 1, 8, 8)}, ["--validation", "{v.pt}"], ["--validation", "v.pt",
                                                                                         "expected 3"]),
    "validation NaN": ({"v.pt": _tensor(8, 3, 8, 8, fill=float("nan"))}, ["--validation", "{v.pt}"],
                       ["--validation", "NaN"]),
    # --input-shape
    "input shape too large for memory": ({}, ["--input-shape", "1,3,100000,100000"], ["--input-shape",
                                                                                      "GB of memory"]),
    "input shape with x": ({}, ["--input-shape", "1x3x8x8"], ["--input-shape", "1,3,8,8"]),
    "input shape not a number": ({}, ["--input-shape", "1,3,x"], ["--input-shape"]),
    "input shape wrong channels": ({}, ["--input-shape", "1,5,8,8"], ["--input-shape 1,5,8,8", "3 input channels"]),
    "input shape wrong rank": ({}, ["--input-shape", "1,3,8"], ["--input-shape 1,3,8", "4 dimensions"]),
    "input shape zero": ({}, ["--input-shape", "0,3,8,8"], ["--input-shape"]),
    "input shape empty": ({}, ["--input-shape", ""], ["--input-shape"]),
    # outputs
    "onnx suffix txt": ({}, ["--onnx", "{tmp}/out.txt"], ["--onnx", "out.txt", ".onnx"]),
    "onnx suffix pt": ({}, ["--onnx", "{tmp}/out.pt"], ["--onnx", "out.pt"]),
    "onnx without suffix": ({}, ["--onnx", "{tmp}/out"], ["--onnx", ".onnx"]),
    "out as onnx": ({}, ["--out", "{tmp}/m.onnx"], ["--out", "--onnx"]),
    "out as json": ({}, ["--out", "{tmp}/m.json"], ["--out", ".pt2"]),
    "out exists": ({"fast.pt": _text("old")}, [], ["fast.pt", "--force"]),
    "out directory missing": ({}, ["--out", "{tmp}/nodir/m.pt"], ["nodir", "does not exist"]),
    # tracing options
    "leaf module unknown": ({}, ["--leaf-module", "nothing_like_it"], ["--leaf-module", "nothing_like_it"]),
    "leaf module typo": ({}, ["--leaf-module", "conv"], ["--leaf-module", "did you mean"]),
    "concrete arg without =": ({}, ["--concrete-arg", "embed"], ["--concrete-arg", "NAME=VALUE"]),
    # the policy and its options
    "policy unknown method": ({}, ["--policy", "nosuch:0.5"], ["--policy", "nosuch"]),
    "policy yaml syntax": ({"p.yaml": _text("rules:\n  - match: conv1\n    method: [svd\n")}, ["--policy", "{p.yaml}"],
                           ["p.yaml", "line 3"]),
    "policy file missing": ({}, ["--policy", "{tmp}/none.yaml"], ["--policy", "none.yaml"]),
    "policy unknown key": ({"p.yaml": _text("rules:\n  - {match: '*', method: svd, rnak: 2}\n")},
                           ["--policy", "{p.yaml}"], ["rnak"]),
    "policy bad target": ({"p.yaml": _text("target: {macs: 2}\nrules:\n  - {method: auto}\n")},
                          ["--policy", "{p.yaml}"], ["target"]),
    "policy matches nothing": ({"p.yaml": _text("rules:\n  - {match: 'backbone.*', method: svd}\n")},
                               ["--policy", "{p.yaml}"], ["matches no layer"]),
    "policy rank out of range": ({}, ["--policy", "spatial_svd:500"], ["out of range"]),
    "method unknown": ({}, ["--method", "nosuch"], ["--method", "nosuch", "auto"]),
    "target above 1": ({}, ["--target", "macs=2"], ["--target", "macs=2"]),
    "target unknown kind": ({}, ["--target", "flops=0.5"], ["--target", "flops"]),
    "target without value": ({}, ["--target", "macs"], ["--target", "KIND=FRACTION"]),
    "target zero": ({}, ["--target", "latency=0"], ["--target", "latency=0"]),
    "max rel error zero": ({}, ["--max-rel-error", "0"], ["--max-rel-error", "(0, 1]"]),
    "min agreement above 1": ({}, ["--min-agreement", "1.5"], ["--min-agreement"]),
    "memory budget unit": ({}, ["--memory-budget", "2XB"], ["--memory-budget", "2XB"]),
    "time budget negative": ({}, ["--time-budget", "-1"], ["--time-budget"]),
    # measurement options
    "threads zero": ({}, ["--threads", "0"], ["--threads"]),
    "check samples zero": ({}, ["--check-samples", "0"], ["--check-samples"]),
    "repeats zero": ({}, ["--repeats", "0"], ["--repeats"]),
    "warmup negative": ({}, ["--warmup", "-1"], ["--warmup"]),
    "share weights spec": ({}, ["--share-weights", "bits=x"], ["--share-weights"]),
    "weight bits zero": ({}, ["--weight-bits", "0"], ["--weight-bits"]),
    "pruning ratio one": ({}, ["--structured-pruning", "1"], ["--structured-pruning"]),
    # the model
    "arch not importable": ({}, ["--arch", "no_such_module_xyz:build"], ["no_such_module_xyz"]),
    "arch args not an object": ({}, ["--arch-args", "[1]"], ["--arch-args"]),
    "arch factory returns a dict": ({}, ["--arch", "tests.cli_models:not_a_module"], ["not_a_module"]),
    "arch of other width": ({}, ["--arch-args", '{"width": 4}'], ["shape"]),
    "checkpoint with NaN weights": ({"nan.pt": _nan_checkpoint}, ["CHECKPOINT={nan.pt}"], ["non-finite", "conv1"]),
    "checkpoint missing": ({}, ["CHECKPOINT={tmp}/none.pt"], ["none.pt"]),
}


def _files(tmp_path: Path, files: dict) -> dict[str, str]:
    names = {"tmp": str(tmp_path)}
    for name, write in files.items():
        write(tmp_path / name)
        names[name] = str(tmp_path / name)
    return names


def _fill(text: str, names: dict[str, str]) -> str:
    """``{c.pt}`` -> the path of the file the case wrote (str.format would read ``.pt`` as an attribute)."""
    for key, value in names.items():
        text = text.replace("{" + key + "}", value)
    return text


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("case", list(CONVERT_CASES), ids=list(CONVERT_CASES))
def test_convert_bad_input_one_line_exit_2_nothing_written(cli, tmp_path, ckpt, case):
    files, extra, expected = CONVERT_CASES[case]
    names = _files(tmp_path, files)
    before = sorted(os.listdir(tmp_path))
    checkpoint = str(ckpt)
    args = []
    for arg in extra:
        arg = _fill(arg, names)
        if arg.startswith("CHECKPOINT="):
            checkpoint = arg.split("=", 1)[1]
        else:
            args.append(arg)
    code, out, err = cli("convert", checkpoint, "--arch", ARCH, "--input-shape", SHAPE, "--policy", "spatial_svd:0.5",
                         "--out", tmp_path / "fast.pt", *args)
    line = _one_error_line(err)
    assert code == 2, (code, err)
    for text in expected:
        assert _fill(text, names) in line, line
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, not even a staging directory


EXPORT_AND_INSPECT_CASES = {
    "export onnx suffix": (["export", "{ckpt}", "--arch", ARCH, "--input-shape", SHAPE, "--onnx", "{tmp}/m.txt"],
                           ["--onnx", "m.txt"]),
    "export huge input shape": (["export", "{ckpt}", "--arch", ARCH, "--input-shape", "1,3,100000,100000", "--onnx",
                                 "{tmp}/m.onnx"], ["--input-shape"]),
    "inspect huge input shape": (["inspect", "{ckpt}", "--arch", ARCH, "--input-shape", "1,3,100000,100000"],
                                 ["--input-shape"]),
    "inspect wrong channels": (["inspect", "{ckpt}", "--arch", ARCH, "--input-shape", "1,4,8,8"],
                               ["--input-shape 1,4,8,8"]),
    "bench threads": (["bench", "{ckpt}", "--arch", ARCH, "--input-shape", SHAPE, "--threads", "x"], ["--threads"]),
}


@pytest.mark.parametrize("case", list(EXPORT_AND_INSPECT_CASES), ids=list(EXPORT_AND_INSPECT_CASES))
def test_other_commands_bad_input(cli, tmp_path, ckpt, case):
    argv, expected = EXPORT_AND_INSPECT_CASES[case]
    before = sorted(os.listdir(tmp_path))
    code, _, err = cli(*[a.format(ckpt=ckpt, tmp=tmp_path) for a in argv])
    line = _one_error_line(err)
    assert code == 2 and all(text in line for text in expected), line
    assert sorted(os.listdir(tmp_path)) == before


# -- the API twins ---------------------------------------------------------------------------------
X = torch.randn(1, 3, 8, 8)
API_CASES = {
    "calibration 1 channel": ({"calibration": torch.randn(16, 1, 8, 8)}, "calibration", "expected 3"),
    "calibration 1-D": ({"calibration": torch.randn(16)}, "calibration", "1 dimensions"),
    "calibration 2-D": ({"calibration": torch.randn(32, 32)}, "calibration", "expected 4"),
    "calibration NHWC": ({"calibration": np.zeros((4, 8, 8, 3), np.float32)}, "calibration", "channels last"),
    "calibration 0 samples": ({"calibration": torch.randn(0, 3, 8, 8)}, "calibration", "0 samples"),
    "calibration empty list": ({"calibration": []}, "calibration", "no batch"),
    "calibration NaN": ({"calibration": torch.full((2, 3, 8, 8), float("nan"))}, "calibration", "NaN"),
    "calibration uint8": ({"calibration": torch.zeros(2, 3, 8, 8, dtype=torch.uint8)}, "calibration", "uint8"),
    "calibration a string": ({"calibration": "data.pt"}, "calibration", "got str"),
    "calibration batch of wrong size": ({"calibration": [torch.randn(2, 3, 8, 8), torch.randn(2, 2, 8, 8)]},
                                        "calibration", "expected 3"),
    "calibration loader of wrong shape": ({"calibration": torch.utils.data.DataLoader(torch.randn(4, 8, 8),
                                                                                      batch_size=2)},
                                          "calibration", "expected 4"),
    "validation 1 channel": ({"validation": torch.randn(8, 1, 8, 8)}, "validation", "expected 3"),
    "validation 0 samples": ({"validation": torch.randn(0, 3, 8, 8)}, "validation", "0 samples"),
    "example wrong channels": ({"example_inputs": torch.randn(1, 1, 8, 8)}, "example_inputs", "3 input channels"),
    "example wrong rank": ({"example_inputs": torch.randn(3, 8, 8)}, "example_inputs", "4 dimensions"),
    "example int64": ({"example_inputs": torch.zeros(1, 3, 8, 8, dtype=torch.long)}, "example_inputs", "int64"),
    "example float64": ({"example_inputs": torch.zeros(1, 3, 8, 8, dtype=torch.float64)}, "example_inputs",
                        "float64"),
    "example not a tensor": ({"example_inputs": [[1.0, 2.0]]}, "example input", "list"),
    "leaf module unknown": ({"leaf_modules": ["nothing_like_it"]}, "leaf_modules", "nothing_like_it"),
    "leaf module class absent": ({"leaf_modules": [nn.LSTM]}, "leaf_modules", "LSTM"),
    "latency unknown key": ({"latency": {"thread": 1}}, "latency", "thread"),
    "latency bad value": ({"latency": {"threads": 0}}, "latency", "threads"),
    "leaf modules a string": ({"leaf_modules": "conv1"}, "leaf_modules", "expected a list"),
    "leaf modules not iterable": ({"leaf_modules": 5}, "leaf_modules", "got int"),
    "concrete args a list": ({"concrete_args": [1]}, "concrete_args", "mapping"),
    "concrete args unknown name": ({"concrete_args": {"embed": True}}, "concrete_args", "its arguments: x"),
    "auto options a dict": ({"auto_options": {"sequential": False}}, "auto_options", "AutoOptions"),
    "memory budget negative": ({"auto_options": AutoOptions(memory_budget=-1)}, "auto_options.memory_budget",
                               "positive"),
    "memory budget text": ({"auto_options": AutoOptions(memory_budget="2GB")}, "auto_options.memory_budget",
                           "'2GB'"),
    "metric evaluations negative": ({"auto_options": AutoOptions(metric_evaluations=-1)},
                                    "auto_options.metric_evaluations", ">= 0, got -1"),
    "fidelity samples zero": ({"auto_options": AutoOptions(fidelity_samples=0)}, "auto_options.fidelity_samples",
                              ">= 1, got 0"),
    "bins a float": ({"auto_options": AutoOptions(bins=40.5)}, "auto_options.bins", "whole number"),
    "workers zero": ({"auto_options": AutoOptions(workers=0)}, "auto_options.workers", ">= 1, got 0"),
    "damping negative": ({"auto_options": AutoOptions(damping=-1.0)}, "auto_options.damping", "positive"),
    "damping zero": ({"auto_options": AutoOptions(damping=0.0)}, "auto_options.damping", "got 0.0"),
    "fractions above 1": ({"auto_options": AutoOptions(fractions=(0.5, 2.0))}, "auto_options.fractions",
                          "(0.5, 2.0)"),
    "fractions empty": ({"auto_options": AutoOptions(fractions=())}, "auto_options.fractions", "non-empty"),
    "fractions a number": ({"auto_options": AutoOptions(fractions=0.5)}, "auto_options.fractions", "got 0.5"),
    "policy unknown method": ({"policy": "nosuch"}, "nosuch", "method"),
    "policy rank out of range": ({"policy": "spatial_svd:500"}, "rule 1", "out of range"),
    "policy matches nothing": ({"policy": {"rules": [{"match": "backbone.*", "method": "svd"}]}}, "policy",
                               "matches no layer"),
}


@pytest.mark.parametrize("case", list(API_CASES), ids=list(API_CASES))
def test_factorize_bad_argument_is_one_line_convfactor_error(case):
    changes, named, expected = API_CASES[case]
    model = randomized(TinyNet()).train()  # train mode: a check that ran it must restore the flags
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {"policy": "spatial_svd:0.5", "example_inputs": X, **changes}
    with pytest.raises(ConvfactorError) as info:
        convfactor.factorize(model, kwargs.pop("policy"), kwargs.pop("example_inputs"), **kwargs)
    message = str(info.value)
    assert "\n" not in message and named in message and expected in message, message
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BN statistics untouched


@pytest.mark.parametrize("measure", ["check_fidelity", "benchmark"])
def test_an_input_shape_too_large_for_memory_is_refused_before_allocating(measure):
    model = randomized(TinyNet())
    with pytest.raises(InputSpecError, match=r"^input_shape 1,3,100000,100000: one input tensor would take 120 GB"):
        getattr(convfactor.runtime, measure)(model, model, input_shape=(1, 3, 100000, 100000))


def test_factorize_refuses_nan_weights_like_the_cli():
    model = randomized(TinyNet())
    with torch.no_grad():
        model.proj.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ConvfactorError, match=r"non-finite weights: proj\.weight \(0 NaN, 1 Inf\)"):
        convfactor.factorize(model, "spatial_svd:0.5", X)


# -- the validator as other arguments use it (held-out validation data) ------------------------------
def test_check_inputs_names_the_flag_and_file_it_is_given():
    model = randomized(TinyNet())
    with pytest.raises(InputSpecError, match=r"^--validation val\.pt: holds 1 channels .* expected 3"):
        check_inputs(model, torch.randn(5, 1, 8, 8), argument="validation", flag="--validation", path="val.pt",
                     example_inputs=(X,))
    with pytest.raises(InputSpecError, match=r"^validation: contains NaN"):
        check_inputs(model, torch.full((5, 3, 8, 8), float("nan")), argument="validation", example_inputs=(X,))


def test_another_spatial_size_is_accepted_when_the_network_runs_on_it_and_reported():
    model = randomized(TinyNet())
    found = check_inputs(model, [(torch.randn(6, 3, 16, 16), torch.arange(6))], argument="validation",
                         example_inputs=(X,))  # a list of (inputs, labels) batches: the labels are not inputs
    assert found.samples == 6 and found.shapes == ((3, 16, 16),)
    assert "3,16,16" in found.note and "3,8,8" in found.note and "runs on them" in found.note

    class Fixed(nn.Module):  # a flatten + Linear head takes only the size it was built for
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 2)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))

    with pytest.raises(InputSpecError, match=r"^calibration: the model cannot run on samples shaped 3,16,16: "
                                             r"RuntimeError: mat1 and mat2"):
        check_inputs(Fixed(), torch.randn(2, 3, 16, 16), argument="calibration", example_inputs=(X,))


def test_a_model_taking_indices_refuses_float_samples_and_accepts_its_own_dtype():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    ids = torch.randint(0, 10, (1, 3))
    assert check_inputs(model, torch.randint(0, 10, (5, 3)), argument="calibration", example_inputs=(ids,)).samples == 5
    with pytest.raises(InputSpecError, match=r"^calibration: holds float32 values; the model takes int64 inputs"):
        check_inputs(model, torch.rand(5, 3), argument="calibration", example_inputs=(ids,))


def test_a_one_shot_iterator_is_not_consumed_by_the_check():
    batches = iter([torch.randn(2, 3, 8, 8)])
    found = check_inputs(randomized(TinyNet()), batches, argument="calibration", example_inputs=(X,))
    assert found.samples is None and "not checked" in found.note
    assert next(batches).shape == (2, 3, 8, 8)


def test_cli_reports_calibration_of_another_size_and_json_keeps_the_note(cli, tmp_path, ckpt):
    torch.save(torch.randn(4, 3, 16, 16), tmp_path / "c.pt")
    code, out, err = cli("convert", ckpt, "--arch", ARCH, "--input-shape", SHAPE, "--policy", "spatial_svd:0.5",
                         "--calibration", tmp_path / "c.pt", "--out", tmp_path / "fast.pt", "--json")
    assert code == 0, err
    assert "note: --calibration" in err and "where --input-shape gives 3,8,8" in err
    notes = json.loads(out)["factorize"]["notes"]
    assert any("3,16,16" in note for note in notes), notes
