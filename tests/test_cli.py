"""The convfactor command line, end to end: input formats, outputs, every bad input, exit codes.

Most cases call ``convfactor.cli.main(argv)`` in-process (a subprocess costs seconds of torch import);
a few real subprocesses check the console script, ``python -m convfactor`` and exit codes.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import convfactor
import convfactor.runtime.export
from convfactor.errors import ExportError
from convfactor.files.checkpoint import read_checkpoint
from convfactor.files.exported_program import lift_exported_module
from convfactor.files.serialize import load
from convfactor.ranks import fraction_to_rank, kept_energy
from tests.cli_models import GatedNet, TinyNet, randomized

REPO = Path(__file__).resolve().parents[1]
ARCH = "tests.cli_models:tiny_net"
SHAPE = "1,3,8,8"
X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))


@pytest.fixture
def net():
    return randomized(TinyNet())


@pytest.fixture
def ckpt(tmp_path, net):
    path = tmp_path / "net.pt"
    torch.save(net.state_dict(), path)
    return path


def _factorized_reference(model, policy):
    return convfactor.factorize(model, policy, X[:1])


def _leftovers(directory, keep):
    """Files and folders in ``directory`` other than ``keep``: outputs, temporaries, staging dirs."""
    return sorted(set(os.listdir(directory)) - {Path(k).name for k in keep})


# -- convert: input formats -------------------------------------------------------------------------
def test_convert_state_dict(cli, tmp_path, ckpt, net):
    out = tmp_path / "fast.pt"
    code, stdout, err = cli("convert", ckpt, "--arch", ARCH, "--policy", "spatial_svd:0.5", "--out", out,
                            "--input-shape", SHAPE)
    assert code == 0, err
    assert "spatial_svd" in stdout and "layers replaced: 1/4" in stdout and "(only_if_cheaper)" in stdout and f"wrote {out}" in stdout
    assert "loading" in err  # progress notes go to stderr
    assert _leftovers(tmp_path, [ckpt]) == ["fast.pt", "fast.report.json"]
    reloaded = load(out, arch=ARCH)
    with torch.no_grad():
        assert torch.equal(reloaded(X), _factorized_reference(net, "spatial_svd:0.5")(X))
    report = json.loads((tmp_path / "fast.report.json").read_text())
    assert report["status"] == "ok" and report["input"]["kind"] == "state_dict"
    assert report["factorize"]["totals"]["layers_replaced"] == 1  # conv2 and proj would cost as many MACs: skipped
    assert report["outputs"] == {"model": str(out), "report": str(tmp_path / "fast.report.json"), "onnx": None}


def test_convert_nested_state_dict_with_module_prefix(cli, tmp_path, net, key="model_state_dict"):
    ckpt = tmp_path / "trained.pth"
    torch.save({key: {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 12}, ckpt)
    out = tmp_path / "fast.pt"
    code, stdout, err = cli("convert", ckpt, "--arch", ARCH, "--policy", "tucker2:0.5", "--out", out,
                            "--input-shape", SHAPE, "--json", "--quiet")
    assert code == 0, err
    document = json.loads(stdout)
    assert f"state_dict nested under {key!r}" in document["input"]["notes"]
    assert "stripped the 'module.' prefix" in document["input"]["notes"]
    with torch.no_grad():
        assert torch.equal(load(out, arch=ARCH)(X), _factorized_reference(net, "tucker2:0.5")(X))


def test_convert_arch_by_file_path_and_kwargs(cli, tmp_path):
    model = randomized(TinyNet(width=4, num_classes=3))
    ckpt = tmp_path / "net.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "fast.pt"
    code, _, err = cli("convert", ckpt, "--arch", f"{REPO / 'tests' / 'cli_models.py'}:tiny_net",
                       "--arch-args", '{"width": 4, "num_classes": 3}', "--policy", "spatial_svd:0.5",
                       "--out", out, "--input-shape", SHAPE, "--quiet")
    assert code == 0, err
    payload = torch.load(out, weights_only=True)
    assert payload["arch"]["kwargs"] == {"width": 4, "num_classes": 3}
    with torch.no_grad():
        assert torch.equal(load(out, trust_code=True)(X), _factorized_reference(model, "spatial_svd:0.5")(X))


def test_convert_pickled_module_needs_trust(cli, tmp_path, net):
    ckpt = tmp_path / "whole.pt"
    torch.save(net, ckpt)
    out = tmp_path / "fast.pt"
    argv = ["convert", ckpt, "--policy", "spatial_svd:0.5", "--out", out, "--input-shape", SHAPE, "--quiet"]
    code, _, err = cli(*argv)
    assert code == 2
    assert err.startswith("error: ") and "--trust-checkpoint" in err and "tests.cli_models.TinyNet" in err
    assert _leftovers(tmp_path, [ckpt]) == []
    code, _, err = cli(*argv, "--trust-checkpoint")
    assert code == 0, err
    with pytest.raises(convfactor.ConvfactorError, match="trust_checkpoint=True"):
        load(out)
    with torch.no_grad():
        assert torch.equal(load(out, trust_checkpoint=True)(X), _factorized_reference(net, "spatial_svd:0.5")(X))


def test_convert_exported_program_in_and_out(cli, tmp_path, net):
    program = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (X[:1],)), program)
    out, out_program = tmp_path / "fast.pt", tmp_path / "fast_program.pt2"
    # No --input-shape: the program's example input gives it.
    code, _, err = cli("convert", program, "--policy", "spatial_svd:1.0", "--out", out, "--quiet")
    assert code == 0, err
    reference = convfactor.factorize(lift_exported_module(read_checkpoint(program).content), "spatial_svd:1.0", X[:1])
    with torch.no_grad():
        assert torch.equal(load(out)(X), reference(X))
        expected = net(X)
        assert float((load(out)(X) - expected).norm() / expected.norm()) <= 1e-5  # full rank: exact
    code, _, err = cli("convert", program, "--policy", "spatial_svd:1.0", "--out", out_program, "--quiet")
    assert code == 0, err
    exported = torch.export.load(out_program).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(X[:1]), reference(X[:1]), rtol=1e-6, atol=1e-6)


def test_convert_untraceable_model_with_leaf_module_or_without_trace(cli, tmp_path):
    model = randomized(GatedNet())
    ckpt = tmp_path / "gated.pt"
    torch.save(model.state_dict(), ckpt)
    base = ["convert", ckpt, "--arch", "tests.cli_models:gated_net", "--policy", "spatial_svd:0.5",
            "--input-shape", SHAPE, "--quiet"]
    code, _, err = cli(*base, "--out", tmp_path / "fails.pt")
    assert code == 2 and "module 'gate' (Gate)" in err and "--leaf-module Gate" in err and "--no-trace" in err
    for extra, name in ((["--leaf-module", "Gate"], "leaf.pt"), (["--no-trace"], "no_trace.pt")):
        code, _, err = cli(*base, *extra, "--out", tmp_path / name)
        assert code == 0, err
        options = {"leaf_modules": ["Gate"]} if name == "leaf.pt" else {"trace": False}
        reference = convfactor.factorize(model, "spatial_svd:0.5", X[:1], **options)
        with torch.no_grad():
            assert torch.equal(load(tmp_path / name, arch="tests.cli_models:gated_net")(X), reference(X))


def test_convert_default_input_shape_from_the_architecture(cli, tmp_path, net):
    ckpt = tmp_path / "net.pt"
    torch.save(net.state_dict(), ckpt)
    code, stdout, err = cli("convert", ckpt, "--arch", "tests.cli_models:tiny_net_with_shape", "--policy",
                            "spatial_svd:0.5", "--out", tmp_path / "fast.pt", "--json")
    assert code == 0, err
    assert json.loads(stdout)["factorize"]["input_shapes"] == [[1, 3, 8, 8]]
    code, stdout, _ = cli("convert", ckpt, "--arch", ARCH, "--policy", "spatial_svd:0.5",
                          "--out", tmp_path / "no_macs.pt", "--json", "--quiet")
    assert code == 0 and json.loads(stdout)["factorize"]["macs_before"] is None  # MACs need a shape


def test_convert_quiet_prints_nothing_and_force_overwrites(cli, tmp_path, ckpt):
    out = tmp_path / "fast.pt"
    argv = ["convert", ckpt, "--arch", ARCH, "--policy", "svd:0.5", "--out", out, "--input-shape", SHAPE, "--quiet"]
    assert cli(*argv) == (0, "", "")
    first = out.read_bytes()
    code, _, err = cli(*argv[:-5], "--policy", "spatial_svd:0.5", *argv[-5:])
    assert code == 2 and "exists" in err and "--force" in err
    assert out.read_bytes() == first
    code, _, err = cli(*argv[:-5], "--policy", "spatial_svd:0.5", *argv[-5:], "--force")
    assert code == 0, err
    assert out.read_bytes() != first
    assert _leftovers(tmp_path, [ckpt]) == ["fast.pt", "fast.report.json"]


# -- convert: bad input -----------------------------------------------------------------------------
def _bad_cases():
    """name -> (setup(tmp_path, ckpt) -> extra files made, argv after 'convert', expected message regex)."""
    def write(name, content):
        def setup(tmp_path, ckpt):
            path = tmp_path / name
            if isinstance(content, bytes):
                path.write_bytes(content)
            elif callable(content):
                content(path, ckpt)
            else:
                path.write_text(content)
            return [path]
        return setup

    def truncated(path, ckpt):
        path.write_bytes(ckpt.read_bytes()[:300])

    def pickled(path, ckpt):
        torch.save(TinyNet(), path)

    def wide(path, ckpt):
        torch.save(TinyNet(width=16).state_dict(), path)

    def gated(path, ckpt):
        torch.save(GatedNet().state_dict(), path)

    def non_finite(path, ckpt):
        state = torch.load(ckpt, weights_only=True)
        state["conv2.weight"][0, 0, 0, 0] = float("inf")
        torch.save(state, path)

    def factorized(path, ckpt):
        fast = convfactor.factorize(TinyNet(), "svd", X[:1])
        convfactor.files.serialize.save_factorized(fast, path, arch=ARCH)

    none = lambda tmp_path, ckpt: []  # noqa: E731
    base = ["--arch", ARCH, "--policy", "spatial_svd:0.5", "--input-shape", SHAPE]
    return {
        "missing file": (none, ["{tmp}/nothing.pt", *base], r"checkpoint not found: .*nothing\.pt"),
        "directory": (none, ["{tmp}", *base], "is a directory"),
        "truncated": (write("cut.pt", truncated), ["{tmp}/cut.pt", *base], "corrupt or truncated"),
        "garbage": (write("junk.pt", b"PK\x03\x04 not really a zip" * 20), ["{tmp}/junk.pt", *base],
                    "corrupt or truncated"),
        "pickle without trust": (write("whole.pt", pickled), ["{tmp}/whole.pt", *base], "--trust-checkpoint"),
        "arch not importable": (none, ["{ckpt}", "--arch", "no_such_pkg.models:net", "--policy", "svd"],
                                "no module named 'no_such_pkg.models'"),
        "arch missing attribute": (none, ["{ckpt}", "--arch", "tests.cli_models:nope", "--policy", "svd"],
                                   "has no attribute 'nope'"),
        "arch returns non-module": (none, ["{ckpt}", "--arch", "tests.cli_models:not_a_module", "--policy", "svd"],
                                    "returned dict, not a torch.nn.Module"),
        "arch raises": (none, ["{ckpt}", "--arch", "tests.cli_models:raising_factory", "--policy", "svd"],
                        "raised RuntimeError: cannot build this model"),
        "arch args not JSON": (none, ["{ckpt}", "--arch", ARCH, "--arch-args", "{width: 3}", "--policy", "svd"],
                               "--arch-args is not valid JSON"),
        "no arch for state_dict": (none, ["{ckpt}", "--policy", "svd"], "holds a state_dict: pass --arch"),
        "shape mismatch": (write("wide.pt", wide), ["{tmp}/wide.pt", *base],
                           r"does not fit the architecture: .*shape mismatch.*conv1\.weight \[16, 3, 3, 3\] vs "
                           r"\[8, 3, 3, 3\]"),
        "unknown method": (none, ["{ckpt}", "--arch", ARCH, "--policy", "magic:0.5"], "unknown method 'magic'"),
        "empty policy file": (write("empty.yaml", ""), ["{ckpt}", "--arch", ARCH, "--policy", "{tmp}/empty.yaml"],
                              "policy file is empty"),
        "missing policy file": (none, ["{ckpt}", "--arch", ARCH, "--policy", "{tmp}/none.yaml"],
                                "policy file not found"),
        "invalid policy": (write("bad.json", '{"rules": [{"method": "svd", "rank": -2}]}'),
                           ["{ckpt}", "--arch", ARCH, "--policy", "{tmp}/bad.json"], "'rank' must be >= 1"),
        "policy matches nothing": (write("p.yaml", "rules:\n  - {match: 'backbone.*', method: svd}\n"),
                                   ["{ckpt}", "--arch", ARCH, "--policy", "{tmp}/p.yaml"], "matches no layer"),
        "rank too large": (none, ["{ckpt}", "--arch", ARCH, "--policy", "spatial_svd:500"], "out of range"),
        "input shape does not fit": (none, ["{ckpt}", "--arch", ARCH, "--policy", "svd", "--input-shape", "1,5,8,8"],
                                     "--input-shape 1,5,8,8 does not fit the model: its first layer conv1 "
                                     r"\(Conv2d\) takes 3 input channels, got 5"),
        "input shape malformed": (none, ["{ckpt}", "--arch", ARCH, "--policy", "svd", "--input-shape", "1,3,x"],
                                  "--input-shape must be positive integers"),
        "untraceable": (write("gated.pt", gated), ["{tmp}/gated.pt", "--arch", "tests.cli_models:gated_net",
                                                   "--policy", "svd"], "torch.fx could not trace GatedNet"),
        "non-finite weights": (write("inf.pt", non_finite), ["{tmp}/inf.pt", *base],
                               r"non-finite weights: conv2\.weight \(0 NaN, 1 Inf\)"),
        "output exists": (write("fast.pt", "old"), ["{ckpt}", *base], "fast.pt exists"),
        "output directory missing": (none, ["{ckpt}", *base, "--out", "{tmp}/no/such/dir/fast.pt"],
                                     "directory .*no/such/dir does not exist"),
        "output is the input": (none, ["{ckpt}", *base, "--out", "{ckpt}", "--force"], "is an input file"),
        "onnx without input shape": (none, ["{ckpt}", "--arch", ARCH, "--policy", "svd", "--onnx", "{tmp}/f.onnx"],
                                     "--input-shape is required for --onnx"),
        "already factorized": (write("done.pt", factorized), ["{tmp}/done.pt", "--arch", ARCH, "--policy", "svd"],
                               "already factorized"),
        "missing --policy": (none, ["{ckpt}", "--arch", ARCH], "convert needs a policy: --policy"),
    }


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_convert_bad_input_exits_2_and_writes_nothing(cli, tmp_path, ckpt, case):
    setup, argv, message = BAD_CASES[case]
    made = setup(tmp_path, ckpt)
    before = {p: p.read_bytes() for p in made if p.is_file()}
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(ckpt)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "fast.pt")]
    code, stdout, err = cli("convert", *argv, "--quiet")
    assert code == 2
    assert stdout == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert _leftovers(tmp_path, [ckpt, *made]) == []  # no output, report, temporary or staging directory
    assert {p: p.read_bytes() for p in made if p.is_file()} == before


def _fail_on_publish(monkeypatch, failing_call):
    """Make the ``failing_call``-th file move into place fail as a full disk would."""
    import convfactor.files.atomic as atomic

    real, calls = atomic.publish, []

    def publish(temp, path, force):
        calls.append(Path(path).name)
        if len(calls) == failing_call:
            raise OSError(28, "No space left on device", str(path))
        return real(temp, path, force)

    monkeypatch.setattr(atomic, "publish", publish)
    return calls


@pytest.mark.parametrize("failing_call", [2, 3])
def test_outputs_are_all_or_nothing_when_publishing_fails_halfway(cli, tmp_path, ckpt, monkeypatch, failing_call):
    argv = ["convert", ckpt, "--arch", ARCH, "--policy", "spatial_svd:0.5", "--input-shape", SHAPE,
            "--out", tmp_path / "fast.pt", "--onnx", tmp_path / "fast.onnx", "--exporter", "torchscript", "--quiet"]
    calls = _fail_on_publish(monkeypatch, failing_call)
    code, _, err = cli(*argv)
    assert len(calls) == failing_call  # the failure came after some files were already in place
    assert code == 2 and "No space left on device" in err and err.count("\n") == 1
    assert _leftovers(tmp_path, [ckpt]) == []  # none of them stays


def test_outputs_are_all_or_nothing_over_existing_files(cli, tmp_path, ckpt, monkeypatch):
    names = ["fast.pt", "fast.onnx", "fast.report.json"]
    for name in names:
        (tmp_path / name).write_text(f"old {name}")
    argv = ["convert", ckpt, "--arch", ARCH, "--policy", "spatial_svd:0.5", "--input-shape", SHAPE,
            "--out", tmp_path / "fast.pt", "--onnx", tmp_path / "fast.onnx", "--exporter", "torchscript", "--quiet",
            "--force"]
    import convfactor.files.atomic as atomic

    real_publish = atomic.publish
    calls = _fail_on_publish(monkeypatch, 3)
    code, _, _ = cli(*argv)
    assert code == 2 and len(calls) == 3
    assert _leftovers(tmp_path, [ckpt]) == sorted(names)
    assert {n: (tmp_path / n).read_text() for n in names} == {n: f"old {n}" for n in names}  # the old set
    monkeypatch.setattr(atomic, "publish", real_publish)
    code, _, err = cli(*argv)  # and it works when nothing fails
    assert code == 0, err
    assert (tmp_path / "fast.report.json").read_text().startswith("{")
    assert (tmp_path / "fast.pt").read_bytes()[:2] == b"PK"


def test_unwritable_output_directory(cli, tmp_path, ckpt):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        try:  # root ignores permissions: then this case cannot be produced here
            tempfile.NamedTemporaryFile(dir=locked).close()
            pytest.skip("the directory stays writable (running as root)")
        except OSError:
            pass
        code, _, err = cli("convert", ckpt, "--arch", ARCH, "--policy", "svd", "--out", locked / "fast.pt",
                           "--quiet")
        assert code == 2 and "is not writable" in err
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


def test_output_directory_refusing_files(cli, tmp_path, ckpt, monkeypatch):
    """What a read-only filesystem does even to root: creating the file fails; nothing else is written."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == locked:
            raise OSError(30, "Read-only file system")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    code, _, err = cli("convert", ckpt, "--arch", ARCH, "--policy", "svd", "--out", tmp_path / "fast.pt",
                       "--onnx", locked / "fast.onnx", "--input-shape", SHAPE, "--quiet")
    assert code == 2 and err == f"error: cannot write {locked / 'fast.onnx'}: directory {locked} is not writable " \
                                "(Read-only file system)\n"
    assert _leftovers(tmp_path, [ckpt, locked]) == [] and os.listdir(locked) == []


# -- convert: atomic outputs ------------------------------------------------------------------------
def test_failure_while_writing_leaves_no_partial_file(cli, tmp_path, ckpt, monkeypatch):
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:
            handle.truncate(64)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    code, _, err = cli("convert", ckpt, "--arch", ARCH, "--policy", "svd", "--out", tmp_path / "fast.pt",
                       "--input-shape", SHAPE, "--quiet")
    assert code == 2 and "No space left on device" in err
    assert _leftovers(tmp_path, [ckpt]) == []


def test_failure_after_the_model_is_staged_publishes_nothing(cli, tmp_path, ckpt, monkeypatch):
    def failing_export(*args, **kwargs):
        raise ExportError("dynamo export failed: simulated")

    monkeypatch.setattr(convfactor.runtime.export, "export_onnx", failing_export)
    code, _, err = cli("convert", ckpt, "--arch", ARCH, "--policy", "svd", "--out", tmp_path / "fast.pt",
                       "--onnx", tmp_path / "fast.onnx", "--input-shape", SHAPE, "--quiet")
    assert code == 2 and err == "error: dynamo export failed: simulated\n"
    assert _leftovers(tmp_path, [ckpt]) == []


# -- convert: ONNX, fidelity, latency ---------------------------------------------------------------
def test_convert_with_onnx_check_and_bench(cli, tmp_path, ckpt, net):
    """Full rank, so every output criterion passes except an impossible SNR: exit 1, files written."""
    out, onnx_path = tmp_path / "fast.pt", tmp_path / "fast.onnx"
    code, stdout, err = cli("convert", ckpt, "--arch", ARCH, "--policy", "spatial_svd:1.0", "--out", out,
                            "--onnx", onnx_path, "--input-shape", SHAPE, "--check", "--check-samples", "4",
                            "--min-snr-db", "400", "--bench", "--threads", "1", "--warmup", "0", "--repeats", "3",
                            "--min-time", "0", "--exporter", "torchscript", "--json", "--quiet")
    assert code == 1
    assert err.startswith("error: fidelity check failed") and "snr_db" in err and "rel_l2_error" not in err
    document = json.loads(stdout)
    assert json.loads((tmp_path / "fast.report.json").read_text()) == document
    assert document["status"].startswith("fidelity check failed: output.snr_db")
    fidelity = document["fidelity"]
    assert fidelity["verdict"] == "fail: factorization" and fidelity["export_passed"] is True
    failed = [c["name"] for o in fidelity["outputs"] for c in o["criteria"] if not c["passed"]]
    assert failed == ["snr_db"]
    assert document["onnx"]["path"] == str(onnx_path) and document["onnx"]["exporter"] == "torchscript"
    assert [r["threads"] for r in document["bench"]["results"]] == [1]
    assert document["bench"]["results"][0]["pairs"] >= 3
    assert _leftovers(tmp_path, [ckpt]) == ["fast.onnx", "fast.pt", "fast.report.json"]
    # The ONNX file computes what the reloaded checkpoint computes.
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: X.numpy()})[0]
    with torch.no_grad():
        expected = load(out, arch=ARCH)(X).numpy()
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 1e-5
    summary = document["summary"]
    totals = document["factorize"]["totals"]
    assert summary["params"] == [totals["params_before"], totals["params_after"], totals["params_ratio"]]
    assert summary["fidelity"] == "fail: factorization"
    assert summary["onnx_file_size"] == onnx_path.stat().st_size
    assert summary["latency"][0]["speedup"] == document["bench"]["results"][0]["speedup"]


def test_convert_profile_adds_time_ratio_column(cli, tmp_path, ckpt):
    code, stdout, err = cli("convert", ckpt, "--arch", ARCH, "--policy", "spatial_svd:0.5", "--out",
                            tmp_path / "fast.pt", "--input-shape", SHAPE, "--profile", "--exporter", "torchscript")
    assert code == 0, err
    header = stdout.splitlines()[0]
    assert "MACs ratio" in header and "time ratio" in header
    document = json.loads((tmp_path / "fast.report.json").read_text())
    times = document["factorize"]["extra"]["layer_times"]
    replaced = [d["name"] for d in document["factorize"]["layers"] if d["status"] == "replaced"]
    assert replaced and all(times[name]["original_ms"] > 0 and times[name]["factorized_ms"] > 0 for name in replaced)
    for line in stdout.splitlines()[2:2 + len(document["factorize"]["layers"])]:
        name = line.split()[0]
        if name in replaced:
            ratio = times[name]["factorized_ms"] / times[name]["original_ms"]
            assert f"{ratio:.3f}" in line
            assert ("SLOWER" in line) == (round(ratio, 3) > 1)
    assert "summary" in stdout and "challenge score" in stdout


# -- inspect, export, bench, methods ----------------------------------------------------------------
def test_inspect_table_and_json(cli, ckpt, net):
    code, stdout, err = cli("inspect", ckpt, "--arch", ARCH, "--input-shape", SHAPE, "--wide")
    assert code == 0, err
    assert "computing spectra" in err
    lines = stdout.splitlines()
    header = lines[0]
    for column in ("layer", "type", "shape", "stride", "groups", "params", "MACs", "MACs %",
                   "spatial_svd 25/50/75%", "tucker2 25/50/75%"):
        assert column in header
    rows = {line.split()[0]: line.split() for line in lines[2:]
            if line and not line.startswith(("4 ", "energy", "challenge score"))}
    assert list(rows) == ["conv1", "conv2", "proj", "fc"]
    assert rows["conv2"][1:5] == ["Conv2d", "8->16", "3x3", "2"]  # type, shape (2 cells), stride
    assert rows["fc"][1:4] == ["Linear", "16->4", "-"]

    code, stdout, _ = cli("inspect", ckpt, "--arch", ARCH, "--input-shape", SHAPE, "--json", "--quiet")
    table = json.loads(stdout)
    layers = {row["name"]: row for row in table["layers"]}
    assert sum(row["macs_share"] for row in table["layers"]) == pytest.approx(1.0, abs=1e-12)
    assert layers["conv2"]["macs"] == 4 * 4 * 8 * 9 * 16  # 4x4 output, 8*3*3 fan-in, 16 channels
    method = convfactor.get_method("spatial_svd")
    spectrum = method.spectra(net.conv2)[0]
    full = method.full_rank(net.conv2)
    expected = [kept_energy(spectrum, fraction_to_rank(f, full)) for f in (0.25, 0.5, 0.75)]
    assert layers["conv2"]["energy"]["spatial_svd"] == pytest.approx(expected, rel=1e-12)
    assert f"{expected[0]:.2f}/{expected[1]:.2f}/{expected[2]:.2f}" in " ".join(rows["conv2"])
    assert layers["fc"]["energy"]["spatial_svd"] == {"unsupported": method.unsupported_reason(net.fc)}
    if "cp" in table["methods"]:
        assert layers["conv2"]["energy"]["cp"] is None  # no spectrum: shown as '-'
    params, macs = table["totals"]["params"], table["totals"]["layer_macs"]
    assert table["challenge_score"]["score"] == pytest.approx(params / 5.6e6 + macs / 2.8e8, rel=1e-12)


def test_inspect_score_options(cli, ckpt):
    code, stdout, _ = cli("inspect", ckpt, "--arch", ARCH, "--input-shape", SHAPE, "--json", "--quiet",
                          "--weight-bits", "8", "--activation-bits", "16", "--structured-pruning", "0.5")
    assert code == 0
    table = json.loads(stdout)
    params, macs = table["totals"]["params"], table["totals"]["layer_macs"]
    expected = 0.5 * (8 / 32) * params / 5.6e6 + 0.5 * (16 / 32) * macs / 2.8e8
    assert table["challenge_score"]["score"] == pytest.approx(expected, rel=1e-12)
    code, _, err = cli("inspect", ckpt, "--arch", ARCH, "--input-shape", SHAPE, "--weight-bits", "0")
    assert code == 2 and "--weight-bits must be in 1..32" in err


def test_inspect_needs_an_input_shape(cli, ckpt):
    code, _, err = cli("inspect", ckpt, "--arch", ARCH, "--quiet")
    assert code == 2 and "--input-shape is required to count MACs" in err
    code, _, err = cli("inspect", ckpt, "--arch", ARCH, "--input-shape", SHAPE, "--methods", "magic")
    assert code == 2 and "unknown method 'magic'" in err


def test_export_and_bench_a_factorized_checkpoint(cli, tmp_path, ckpt):
    out = tmp_path / "fast.pt"
    assert cli("convert", ckpt, "--arch", ARCH, "--policy", "spatial_svd:0.5", "--out", out,
               "--input-shape", SHAPE, "--quiet")[0] == 0
    onnx_path = tmp_path / "fast.onnx"
    code, _, err = cli("export", out, "--onnx", onnx_path, "--quiet")
    assert code == 2 and "names the architecture factory 'tests.cli_models:tiny_net'" in err  # not trusted
    code, stdout, err = cli("export", out, "--onnx", onnx_path, "--arch", ARCH, "--json", "--quiet")  # stored shape
    assert code == 0, err
    assert json.loads(stdout)["onnx"]["path"] == str(onnx_path)
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: X.numpy()})[0]
    with torch.no_grad():
        expected = load(out, arch=ARCH)(X).numpy()
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 1e-5
    code, _, err = cli("export", out, "--onnx", onnx_path, "--arch", ARCH, "--quiet")
    assert code == 2 and "exists" in err

    # TorchScript exports in milliseconds where dynamo takes seconds; the default exporter ran above.
    timing = ["--threads", "1", "--warmup", "0", "--repeats", "3", "--min-time", "0", "--exporter", "torchscript"]
    code, stdout, err = cli("bench", out, *timing, "--trust-checkpoint")
    assert code == 0, err
    assert "timing it alone" in err and "timing it alone" in stdout and "median ms" in stdout
    # The baseline's architecture defaults to the one the factorized checkpoint stores.
    code, stdout, err = cli("bench", out, "--baseline", ckpt, *timing, "--json", "--quiet", "--trust-checkpoint")
    assert code == 0, err
    document = json.loads(stdout)
    assert document["baseline"]["kind"] == "state_dict" and document["input"]["kind"] == "factorized"
    assert document["bench"]["results"][0]["pairs"] >= 3


@pytest.mark.parametrize("command", ["convert", "export", "inspect", "bench"])
def test_a_factorized_file_naming_code_runs_nothing(cli, tmp_path, net, command):
    marker = tmp_path / "pwned"
    fast = convfactor.factorize(net, "spatial_svd:0.5", X[:1])
    payload = convfactor.files.serialize.factorized_payload(
        fast, arch={"factory": "subprocess:getoutput", "kwargs": {"cmd": f"touch {marker}"}})
    evil = tmp_path / "evil.pt"
    torch.save(payload, evil)
    extra = {"convert": ["--policy", "svd", "--out", tmp_path / "again.pt"], "export": ["--onnx", tmp_path / "e.onnx"],
             "inspect": [], "bench": ["--baseline", evil]}[command]
    code, stdout, err = cli(command, evil, *extra, "--quiet")
    assert not marker.exists()
    assert code == 2 and stdout == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "names the architecture factory 'subprocess:getoutput'" in err and "--arch" in err
    assert _leftovers(tmp_path, [evil]) == []


def test_methods(cli):
    code, stdout, _ = cli("methods")
    assert code == 0
    for name in convfactor.available_methods():
        method = convfactor.get_method(name)
        assert f"{name}  {method.summary}" in stdout.replace(" " * 3, "  ") or method.summary in stdout
        assert f"rank: {method.rank_meaning}" in stdout
    code, stdout, _ = cli("methods", "--json")
    assert [m["name"] for m in json.loads(stdout)["methods"]] == convfactor.available_methods()


@pytest.mark.parametrize("command", ["convert", "inspect", "export", "bench", "methods"])
def test_help_has_examples(cli, command):
    code, stdout, _ = cli(command, "--help")
    assert code == 0 and "examples:" in stdout and f"convfactor {command}" in stdout


def test_version_and_usage_errors(cli):
    code, stdout, _ = cli("--version")
    assert code == 0 and stdout.strip() == f"convfactor {convfactor.__version__}"
    code, _, err = cli("frobnicate")
    assert code == 2 and err.startswith("error: argument COMMAND: invalid choice")


# -- real processes ---------------------------------------------------------------------------------
def _run(argv, cwd):
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_console_script_version():
    script = shutil.which("convfactor") or str(Path(sys.executable).parent / "convfactor")
    if not Path(script).exists():
        pytest.skip("the convfactor console script is not installed (pip install -e .)")
    result = _run([script, "--version"], REPO)
    assert result.returncode == 0 and result.stdout.strip() == f"convfactor {convfactor.__version__}"


def test_python_m_convert_end_to_end(tmp_path, ckpt, net):
    out = tmp_path / "fast.pt"
    result = _run([sys.executable, "-m", "convfactor", "convert", str(ckpt), "--arch", ARCH,
                   "--policy", "spatial_svd:0.5", "--out", str(out), "--input-shape", SHAPE, "--json"], REPO)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["factorize"]["totals"]["layers_replaced"] == 1
    with torch.no_grad():
        assert torch.equal(load(out, arch=ARCH)(X), _factorized_reference(net, "spatial_svd:0.5")(X))


def test_python_m_bad_input_exit_code_and_one_line(tmp_path, ckpt):
    result = _run([sys.executable, "-m", "convfactor", "convert", str(ckpt), "--arch", ARCH, "--policy",
                   "spatial_svd:0.5", "--out", str(tmp_path / "fast.pt"), "--input-shape", "1,5,8,8"], REPO)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("error: --input-shape 1,5,8,8 does not fit the model")
    assert "Traceback" not in result.stderr
    assert _leftovers(tmp_path, [ckpt]) == []


def test_convert_output_check_warns_and_check_exits_1(cli, tmp_path, ckpt, monkeypatch):
    """The automatic policy's own output check: shown in the summary, warned on stderr, fails --check."""
    import convfactor.auto.search.verify as verify
    from convfactor.policy import Fidelity

    monkeypatch.setattr(verify, "DEFAULT_FLOOR", Fidelity(max_rel_error=1e-12))  # nothing passes
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"rules": [{"types": ["Conv2d"], "method": "spatial_svd"}],
                                  "target": {"macs": 0.6}}))
    common = ("--arch", ARCH, "--policy", policy, "--input-shape", SHAPE)
    code, stdout, err = cli("convert", ckpt, *common, "--out", tmp_path / "a.pt")
    assert code == 0 and "warning (accuracy): accuracy not kept" in err
    assert "warning (accuracy): selection was weight-only" in err and "--calibration" in err
    assert "output error" in stdout and "OUTSIDE the default floor" in stdout
    loose = ("--max-rel-l2", "10", "--min-cosine", "-1", "--min-snr-db", "-100", "--min-top1", "0")  # --check's own
    code, stdout, err = cli("convert", ckpt, *common, "--out", tmp_path / "b.pt", "--check", "--check-samples", "4",
                            *loose, "--exporter", "torchscript", "--json")
    document = json.loads(stdout)
    assert code == 1 and "output check failed" in err
    assert document["status"].startswith("output check failed")
    assert document["summary"]["output_check"]["passed"] is False
