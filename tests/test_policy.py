"""Policy: plain data, YAML/JSON round trip, first-match precedence, and every error names its rule."""

import json

import pytest
import torch

import convfactor
from convfactor import Policy, PolicyError, RankError
from tests.nets import TinyResNet, randomize_batchnorm

FULL = {
    "rules": [
        {"match": "conv1", "method": "skip"},
        {"match": "layer2.*", "types": ["Conv2d"], "method": "tucker2", "rank": [8, 16]},
        {"match": "layer1.*", "types": ["Conv2d"], "method": "spatial_svd", "energy": 0.9, "align": 8},
        {"match": "*", "types": ["Conv2d", "Linear"], "method": "svd", "rank": 0.5},
    ]
}


def test_target_and_auto_round_trip():
    data = {"rules": [{"match": "*", "types": ["Conv2d"], "method": "auto"}], "target": {"macs": 0.5}}
    policy = Policy.from_dict(data)
    assert policy.target == ("macs", 0.5) and policy.needs_resolution
    assert Policy.from_yaml(policy.to_yaml()).to_dict() == data
    assert not Policy.from_dict(FULL).needs_resolution


@pytest.mark.parametrize(
    "target, message",
    [
        ({"flops": 0.5}, "unknown target 'flops'"),
        ({"macs": 1.5}, r"target macs must be a fraction of the original in \(0, 1\)"),
        ({"macs": 0}, "target macs must be a fraction"),
        ({"macs": 0.5, "params": 0.5}, "'target' must be one of"),
        (0.5, "'target' must be one of"),
    ],
)
def test_target_errors(target, message):
    with pytest.raises(PolicyError, match=message):
        Policy.from_dict({"rules": [{"method": "auto"}], "target": target})


def test_dict_round_trip_is_identity():
    policy = Policy.from_dict(FULL)
    assert policy.to_dict() == FULL
    assert Policy.from_dict(policy.to_dict()) == policy


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_file_round_trip(tmp_path, suffix):
    policy = Policy.from_dict(FULL)
    path = tmp_path / f"policy{suffix}"
    policy.save(path)
    assert Policy.load(path) == policy
    assert Policy.from_any(str(path)) == policy
    if suffix == ".json":
        assert json.loads(path.read_text()) == FULL


def test_yaml_and_json_text_round_trip():
    policy = Policy.from_dict(FULL)
    assert Policy.from_yaml(policy.to_yaml()) == policy
    assert Policy.from_json(policy.to_json()) == policy


def test_first_matching_rule_wins():
    policy = Policy.from_dict(FULL)
    assert policy.rule_for("conv1", "Conv2d")[0] == 0
    assert policy.rule_for("layer2.0.conv1", "Conv2d")[1].method == "tucker2"
    assert policy.rule_for("layer1.1.conv2", "Conv2d")[1].method == "spatial_svd"
    assert policy.rule_for("fc", "Linear")[1].method == "svd"
    assert policy.rule_for("fc", "Conv1d") is None


def test_types_filter_and_glob_crosses_dots():
    policy = Policy.from_dict({"rules": [{"match": "layer*conv2", "types": "Conv2d", "method": "cp"}]})
    assert policy.rule_for("layer1.0.conv2", "Conv2d") is not None
    assert policy.rule_for("layer1.0.conv2", "Linear") is None
    assert policy.rule_for("layer1.0.conv1", "Conv2d") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("spatial_svd", {"rules": [{"match": "*", "method": "spatial_svd"}]}),
        ("tucker2:0.5", {"rules": [{"match": "*", "method": "tucker2", "rank": 0.5, "only_if_cheaper": True}]}),
        ("depthwise:2", {"rules": [{"match": "*", "method": "depthwise", "rank": 2, "only_if_cheaper": True}]}),
        ("spatial_svd:energy=0.95", {"rules": [{"match": "*", "method": "spatial_svd", "energy": 0.95,
                                                "only_if_cheaper": True}]}),
        ("spatial_svd:1.0", {"rules": [{"match": "*", "method": "spatial_svd", "rank": 1.0}]}),
    ],
)
def test_shorthand(text, expected):
    assert Policy.from_any(text).to_dict() == expected


@pytest.mark.parametrize(
    "rule, message",
    [
        ({"method": "spatial_svd", "rnak": 3}, r"policy rule 1: unknown key 'rnak'"),
        ({"match": "a.*", "method": "nope"}, r"policy rule 1 \(match 'a\.\*'\): unknown method 'nope'; known methods: channel_svd, cp"),
        ({"match": "x"}, r"'method' is required"),
        ({"method": "spatial_svd", "rank": 0}, r"'rank' must be >= 1, got 0"),
        ({"method": "spatial_svd", "rank": -3}, r"'rank' must be >= 1"),
        ({"method": "spatial_svd", "rank": 1.5}, r"fractional 'rank' must be in \(0, 1\], got 1.5"),
        ({"method": "spatial_svd", "rank": 0.0}, r"fractional 'rank' must be in \(0, 1\]"),
        ({"method": "spatial_svd", "rank": True}, r"'rank' must be"),
        ({"method": "tucker2", "rank": [4, 0]}, r"'rank' must be"),
        ({"method": "spatial_svd", "rank": "half"}, r"'rank' must be"),
        ({"method": "spatial_svd", "rank": 2, "energy": 0.9}, r"either 'rank' or 'energy'"),
        ({"method": "spatial_svd", "energy": 1.2}, r"'energy' must be a number in \(0, 1\]"),
        ({"method": "spatial_svd", "energy": 0}, r"'energy' must be a number in \(0, 1\]"),
        ({"method": "spatial_svd", "align": 0}, r"'align' must be a positive int"),
        ({"method": "spatial_svd", "types": ["Conv3d"]}, r"unknown layer type 'Conv3d'"),
        ({"method": "skip", "rank": 2}, r"'skip' takes no rank"),
        ({"method": "spatial_svd", "match": ""}, r"'match' must be a non-empty glob"),
    ],
)
def test_rule_errors_name_the_rule(rule, message):
    with pytest.raises(PolicyError, match=message):
        Policy.from_dict({"rules": [rule]})


def test_errors_name_the_right_rule_index():
    rules = [{"method": "skip"}, {"match": "fc", "method": "svd", "bogus": 1}]
    with pytest.raises(PolicyError, match=r"policy rule 2 \(match 'fc'\): unknown key 'bogus'"):
        Policy.from_dict({"rules": rules})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"rules": []}, "non-empty list"),
        ({}, "non-empty list"),
        ({"rules": [{"method": "svd"}], "extra": 1}, "unknown key 'extra'"),
        ([{"method": "svd"}], "must be a mapping"),
        ({"rules": ["svd"]}, "a rule must be a mapping"),
    ],
)
def test_policy_level_errors(data, message):
    with pytest.raises(PolicyError, match=message):
        Policy.from_dict(data)


def test_file_errors(tmp_path):
    with pytest.raises(PolicyError, match="policy file not found"):
        Policy.from_any(str(tmp_path / "missing.yaml"))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(PolicyError, match="policy file is empty"):
        Policy.load(empty)
    broken = tmp_path / "broken.yaml"
    broken.write_text("rules: [\n  - method: svd\n  bad")
    with pytest.raises(PolicyError, match="not valid YAML"):
        Policy.load(broken)
    broken_json = tmp_path / "broken.json"
    broken_json.write_text("{rules: }")
    with pytest.raises(PolicyError, match="not valid JSON"):
        Policy.load(broken_json)


def test_unknown_shorthand_method_lists_known_methods():
    with pytest.raises(PolicyError, match=r"unknown method 'svdd'; known methods: .*spatial_svd"):
        Policy.from_any("svdd")


def test_policy_of_wrong_type():
    with pytest.raises(PolicyError, match="not int"):
        Policy.from_any(3)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return randomize_batchnorm(TinyResNet())


def test_policy_matching_no_layer_is_an_error(resnet):
    with pytest.raises(PolicyError, match=r"matches no layer: its 1 rule\(s\) match none of the 11 Conv2d/Linear layers"):
        convfactor.factorize(resnet, {"rules": [{"match": "backbone.*", "method": "spatial_svd"}]})


def test_rank_out_of_range_names_rule_and_layer(resnet):
    policy = {"rules": [{"match": "conv1", "method": "skip"},
                        {"match": "layer1.*", "types": ["Conv2d"], "method": "spatial_svd", "rank": 49}]}
    with pytest.raises(RankError, match=r"policy rule 2 \(match 'layer1\.\*'.*layer 'layer1\.0\.conv1' .*r=49 is out of "
                                        r"range \[1, 48\]"):
        convfactor.factorize(resnet, policy)


def test_rule_matching_nothing_is_noted(resnet):
    policy = {"rules": [{"match": "nothing.here", "method": "svd"}, {"match": "*", "method": "spatial_svd"}]}
    report = convfactor.get_report(convfactor.factorize(resnet, policy))
    assert any("policy rule 1 (match 'nothing.here'" in n and "matched no layer" in n for n in report.notes)
