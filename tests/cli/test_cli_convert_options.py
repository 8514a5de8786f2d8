"""convert's automatic-policy options: --memory-budget, --max-rel-error, --min-agreement, --no-refit.

Each is parsed before the model is loaded (a bad value: one ``error:`` line, exit 2, nothing written)
and reaches ``factorize`` as the API takes it; the fidelity bound shows in the report and the summary.
"""

import argparse
import json
import os

import pytest
import torch

from convfactor.cli.options import memory_size, unit_fraction

ARCH = "tests.cli_models:tiny_net"
SHAPE = "1,3,8,8"


def _convert(cli, ckpt, *extra, policy="spatial_svd:0.5"):
    return cli("convert", ckpt, "--arch", ARCH, "--input-shape", SHAPE, "--policy", policy,
               "--out", ckpt.with_name("fast.pt"), *extra)


# -- parsing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, size", [("2GB", 2_000_000_000), ("512MiB", 512 * 2**20), ("1000000", 1_000_000),
                                        ("1.5GiB", 3 * 2**29), ("64kb", 64_000), (" 3 TB ", 3 * 10**12),
                                        ("7b", 7)])
def test_memory_size_reads_decimal_and_binary_units(text, size):
    assert memory_size(text) == size


@pytest.mark.parametrize("text", ["2XB", "GB", "", "-1GB", "0", "0.1", "2 G B", "1e9", "nan"])
def test_memory_size_refuses_what_is_not_a_size(text):
    with pytest.raises(argparse.ArgumentTypeError):
        memory_size(text)


@pytest.mark.parametrize("text, ok", [("0.05", True), ("1", True), ("0", False), ("1.5", False), ("-0.1", False),
                                      ("nan", False), ("x", False)])
def test_unit_fraction_is_the_policy_range(text, ok):
    if ok:
        assert unit_fraction(text) == float(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            unit_fraction(text)


@pytest.mark.parametrize("option, value, expected", [
    ("--memory-budget", "2XB", "argument --memory-budget: expected a size like 2GB, 512MiB or 1000000 (bytes), "
                               "got '2XB'"),
    ("--memory-budget", "0", "argument --memory-budget: a size must be at least 1 byte, got '0'"),
    ("--max-rel-error", "2", "argument --max-rel-error: expected a number in (0, 1], got '2'"),
    ("--min-agreement", "high", "argument --min-agreement: expected a number in (0, 1], got 'high'"),
    ("--time-budget", "0", "argument --time-budget: expected a positive number of seconds, got '0'"),
    ("--time-budget", "soon", "argument --time-budget: expected a positive number of seconds, got 'soon'"),
    ("--time-budget", "inf", "argument --time-budget: expected a positive number of seconds, got 'inf'"),
])
def test_bad_values_are_one_line_exit_2_and_nothing_written(cli, tmp_path, ckpt, option, value, expected):
    code, stdout, err = _convert(cli, ckpt, option, value)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {expected} (see 'convfactor convert --help')"), err
    assert os.listdir(tmp_path) == ["net.pt"]


# -- what reaches factorize -------------------------------------------------------------------------
def test_memory_budget_and_no_refit_reach_factorize(cli, tmp_path, ckpt, calls):
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)), calib)
    code, _, err = _convert(cli, ckpt, "--calibration", calib, "--memory-budget", "512MiB", "--no-refit", "--quiet")
    assert code == 0, err
    (call,) = calls
    assert call["auto_options"].memory_budget == 512 * 2**20
    assert call["auto_options"].sequential is False
    report = json.loads(ckpt.with_name("fast.report.json").read_text())
    assert "refit sequentially" not in report["factorize"]["extra"]["auto"]["selection"]


def test_time_budget_reaches_factorize_and_a_spent_budget_is_reported(cli, tmp_path, ckpt, calls):
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)), calib)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"target": {"macs": 0.5}, "rules": [{"match": "*", "method": "auto"}]}))
    code, _, err = _convert(cli, ckpt, "--calibration", calib, "--time-budget", "1e-6", "--quiet", policy=policy)
    assert code in (0, 1), err  # 1: the default fidelity floor may fail once refinement was cut
    (call,) = calls
    assert call["auto_options"].time_budget == pytest.approx(1e-6) and call["auto_options"].sequential is True
    report = json.loads(ckpt.with_name("fast.report.json").read_text())
    budget = report["factorize"]["extra"]["auto"]["time_budget"]
    assert budget["seconds"] == pytest.approx(1e-6) and budget["cut"], budget


def test_without_the_options_factorize_gets_its_defaults(cli, ckpt, calls):
    code, _, err = _convert(cli, ckpt, "--quiet")
    assert code == 0, err
    assert "memory_budget" not in calls[0] and calls[0]["auto_options"] is None
    assert calls[0]["policy"].fidelity is None


def test_options_of_the_automatic_policy_on_a_plain_policy_say_they_do_nothing(cli, ckpt, calls):
    code, _, err = _convert(cli, ckpt, "--memory-budget", "2GB")
    assert code == 0
    assert "note: --memory-budget, --no-refit and --time-budget apply to an automatic policy" in err


def test_fidelity_options_override_the_policy_file_and_show_in_the_summary(cli, tmp_path, ckpt, calls):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"rules": [{"types": ["Conv2d"], "method": "spatial_svd", "rank": 0.5}],
                                  "fidelity": {"max_rel_error": 0.9, "min_agreement": 0.25}}))
    code, stdout, err = _convert(cli, ckpt, "--max-rel-error", "0.8", policy=policy)
    assert code == 0, err
    bound = {"max_rel_error": 0.8, "min_agreement": 0.25}
    assert calls[0]["policy"].fidelity.to_dict() == bound  # the flag wins, the file keeps the rest
    report = json.loads(ckpt.with_name("fast.report.json").read_text())
    assert report["factorize"]["policy"]["requested"]["fidelity"] == bound
    assert report["factorize"]["extra"]["fidelity_check"]["bound"] == bound  # the bound the result was held to
    assert report["summary"]["fidelity_bound"] == {"bound": bound, "from": {"max_rel_error": "--max-rel-error",
                                                                           "min_agreement": "policy"}}
    assert "  fidelity bound   max_rel_error 0.8 (--max-rel-error), min_agreement 0.25 (policy)" in stdout


def test_fidelity_options_add_a_bound_to_a_shorthand_policy(cli, ckpt, calls):
    code, stdout, err = _convert(cli, ckpt, "--min-agreement", "0.5", "--max-rel-error", "0.9")
    assert code == 0, err
    assert calls[0]["policy"].fidelity.to_dict() == {"max_rel_error": 0.9, "min_agreement": 0.5}
    assert "min_agreement 0.5 (--min-agreement)" in stdout
