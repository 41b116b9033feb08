"""KasaConfig validation, patterns and JSON round trip."""

import math

import pytest

from kasa_peft import KasaConfig
from kasa_peft.targeting import name_matches


def test_json_round_trip(tmp_path):
    config = KasaConfig(
        r=4,
        alpha=8,
        dropout=0.1,
        target_modules=["query", "value"],
        beta=1e-3,
        gamma=2e-3,
        rank_pattern={"layer\\.0\\..*query": 2},
        alpha_pattern={"value": 4.0},
        modules_to_save=["classifier"],
        use_rslora=True,
    )
    path = tmp_path / "config.json"
    path.write_text(config.to_json())

    assert KasaConfig.from_json(config.to_json()) == config
    assert KasaConfig.from_json(path) == config


def test_tuple_targets_become_lists():
    assert KasaConfig(target_modules=("q", "v")).target_modules == ["q", "v"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r=0 is invalid"),
        ({"r": -3}, "r=-3 is invalid"),
        ({"r": 2.5}, "r=2.5 is invalid"),
        ({"alpha": 0}, "alpha=0 is invalid"),
        ({"dropout": 1.0}, "dropout=1.0 is invalid"),
        ({"beta": -1.0}, "beta=-1.0 is invalid"),
        ({"gamma": math.nan}, "gamma=nan is invalid"),
        ({"truncation_method": "fast"}, "truncation_method='fast' is unknown"),
        ({"gram_convention": "full"}, "gram_convention='full' is unknown"),
        ({"target_modules": "query("}, "not a valid regular expression"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"target_modules": [1, 2]}, "expected a list of module-name suffixes"),
        ({"rank_pattern": {"query": 0}}, "rank_pattern\\['query'\\]=0 is invalid"),
    ],
)
def test_invalid_values_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KasaConfig(**kwargs)


def test_unknown_field_in_dict_raises():
    with pytest.raises(ValueError, match=r"unknown KasaConfig fields \['rank'\]"):
        KasaConfig.from_dict({"rank": 8})


def test_rank_and_alpha_patterns():
    config = KasaConfig(r=8, alpha=16, rank_pattern={"layer\\.1\\..*": 4}, alpha_pattern={"value": 2.0})

    assert config.rank_for("encoder.layer.0.attention.self.query") == 8
    assert config.rank_for("encoder.layer.1.attention.self.query") == 4
    assert config.alpha_for("encoder.layer.0.attention.self.value") == 2.0
    assert config.alpha_for("encoder.layer.0.attention.self.query") == 16
    # A pattern key matches whole dotted components, not a substring of one.
    assert config.alpha_for("encoder.layer.0.attention.self.myvalue") == 16


def test_scaling():
    assert KasaConfig(r=8, alpha=16).scaling_for("x") == 2.0
    assert KasaConfig(r=16, alpha=16, use_rslora=True).scaling_for("x") == 4.0


def test_target_matching_suffix_and_regex():
    assert name_matches("encoder.layer.0.attention.self.query", ["query"])
    assert not name_matches("encoder.layer.0.attention.self.myquery", ["query"])
    assert name_matches("encoder.layer.0.attention.self.query", r".*layer\.0\..*query")
    assert not name_matches("encoder.layer.10.attention.self.query", r".*layer\.0\..*query")
