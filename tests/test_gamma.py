"""γ in one place: validation, canonical form, key, default set, and the call sites that use it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenskip import config, evaluation, gamma, prompt, sft


@pytest.mark.parametrize(
    "bad,msg",
    [
        (0, "in (0, 1], got 0"),
        (0.0, "in (0, 1], got 0.0"),
        (-0.1, "got -0.1"),
        (1.0000001, "got 1.0000001"),
        (float("nan"), "got nan"),
        (float("inf"), "got inf"),
        (True, "a number in (0, 1], got True"),
        ("0.5", "a number in (0, 1], got '0.5'"),
        (None, "a number in (0, 1], got None"),
        ([0.5], "a number"),
    ],
)
def test_check_refuses_and_names_where(bad, msg):
    with pytest.raises(ValueError, match=r"^eval\.ratios\[2\]: compression ratio must be ") as e:
        gamma.check(bad, "eval.ratios[2]")
    assert msg in str(e.value)


def test_check_accepts_numbers_of_any_real_type():
    assert gamma.check(1) == 1.0 and isinstance(gamma.check(1), float)
    assert gamma.check(np.float32(0.5)) == 0.5 and gamma.check(np.float64(0.25)) == 0.25
    with pytest.raises(ValueError):
        gamma.check(np.bool_(True))


def test_key_is_one_spelling():
    assert [gamma.key(x) for x in (1, 1.0, np.float64(1.0), 0.7, 0.70000001, 0.69999999, 0.75, 0.5)] == [
        "1.0",
        "1.0",
        "1.0",
        "0.7",
        "0.7",
        "0.7",
        "0.75",
        "0.5",
    ]
    assert gamma.parse("1") == gamma.parse("1.0") == gamma.parse(1) == 1.0
    with pytest.raises(ValueError, match="got '1.5'"):
        gamma.parse("1.5")
    with pytest.raises(ValueError, match="got 'nan'"):
        gamma.parse("nan")


@given(st.floats(min_value=0.0001, max_value=1.0))
def test_key_parse_round_trip(x):
    k = gamma.key(x)
    assert gamma.parse(k) == gamma.canonical(x)
    assert gamma.key(gamma.parse(k)) == k
    assert abs(gamma.canonical(x) - x) <= 0.5 * 10**-gamma.DIGITS + 1e-12
    assert not k.endswith("0") or k == "1.0" or k.endswith(".0")


def test_lists():
    assert gamma.check_list((0.9, 0.50000001)) == [0.9, 0.5]
    assert gamma.normalize([0.5, 1, 0.70000001, 0.5, 0.7]) == [1.0, 0.7, 0.5]
    with pytest.raises(ValueError, match=r"^prune\.ratios has duplicates"):
        gamma.check_list([0.7, 0.70000001], "prune.ratios", unique=True)
    for bad in ([], "0.5", 0.5, None):
        with pytest.raises(ValueError):
            gamma.check_list(bad)
    with pytest.raises(ValueError, match=r"^ratios\[1\]: "):
        gamma.normalize([1.0, 2.0])


def test_default_set_is_written_once():
    assert gamma.DEFAULT_RATIOS == (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    assert gamma.PRUNE_RATIOS == (0.9, 0.8, 0.7, 0.6, 0.5)
    assert config.BuildSFTConfig().ratios == list(gamma.DEFAULT_RATIOS) == config.EvalConfig().ratios
    assert config.PruneConfig().ratios == list(gamma.PRUNE_RATIOS)
    from serving.config import ServeAppConfig

    assert ServeAppConfig.from_dict({"model": "m"}).default_ratios == list(gamma.DEFAULT_RATIOS)
    import serving.routing

    assert not hasattr(serving.routing, "DEFAULT_RATIOS") and not hasattr(config, "check_ratio")


def test_call_sites_use_the_key():
    # the prompt marker text did not change
    assert prompt.user_content("Q", 0.5).endswith("Q<|eot_id|>0.5<|eot_id|>")
    assert prompt.user_content("Q", 0.70000001).endswith("Q<|eot_id|>0.7<|eot_id|>")
    assert prompt.user_content("Q", 1) == prompt.user_content("Q") and not prompt.has_marker(1.0)
    assert prompt.format_ratio(0.75) == gamma.key(0.75) == "0.75"
    assert evaluation.condition_id("tokenskip", 1) == "tokenskip-1.0"
    assert list(sft.ratio_stats([{"ratio": 1, "cot_tokens": 4, "pruned_tokens": 4, "actual_ratio": 1.0}])) == ["1.0"]
    with pytest.raises(config.ConfigError, match=r"eval\.ratios\[1\]: compression ratio must be in \(0, 1\], got 1.5"):
        config.EvalConfig(ratios=[1.0, 1.5])
    with pytest.raises(config.ConfigError, match="duplicates"):
        config.PruneConfig(ratios=[0.5, 0.50000001])
    with pytest.raises(config.ConfigError, match="build_sft.ratios must not be empty"):
        config.BuildSFTConfig(ratios=[])


def test_manifest_keys_from_train_are_canonical():
    from tokenskip.card import rows_per_ratio

    assert rows_per_ratio([{"ratio": 1}, {"ratio": 1.0}, {"ratio": 0.5}]) == {"1.0": 2, "0.5": 1}
    assert math.isclose(sum(rows_per_ratio([{"ratio": r} for r in gamma.DEFAULT_RATIOS]).values()), 6)
