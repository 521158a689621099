import pytest

from ditopt import Config, preset_config
from ditopt.config import LOWERINGS, PRESETS


def test_default_is_the_balanced_preset_and_lossless_is_exact():
    cfg = Config.from_options(None)
    assert cfg.preset == "balanced" and cfg.adacache.enabled and cfg.lowering == "inductor"
    assert Config.from_options({}).preset == "balanced"
    assert Config.from_options({"preset": "lossless"}).lossless


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_expands_and_validates(preset):
    cfg = Config.from_options({"preset": preset})
    assert cfg.preset == preset
    assert cfg.lossless == (preset == "lossless")


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['presett'\].*'preset'"):
        Config.from_options({"presett": "fast"})


def test_bad_preset_and_lowering_list_choices():
    with pytest.raises(ValueError, match="choose one of.*'balanced'"):
        Config.from_options({"preset": "turbo"})
    with pytest.raises(ValueError, match=f"choose one of.*{LOWERINGS[0]}"):
        Config.from_options({"lowering": "tvm"})


def test_unknown_method_key_lists_valid_keys():
    with pytest.raises(ValueError, match="unknown key.*'ratio_q'.*valid keys.*'codebook'"):
        Config.from_options({"adacache": {"ratio_q": 1}})


def test_method_section_false_turns_method_off():
    cfg = Config.from_options({"preset": "fast", "adacache": False})
    assert not cfg.adacache.enabled and cfg.lossless


def test_toca_options_from_the_issue_and_a_reference_preset():
    cfg = Config.from_options({"toca": {"interval": 3, "ratio": 0.1}})
    assert cfg.toca.enabled and (cfg.toca.interval, cfg.toca.ratio) == (3, 0.1)
    pixart = Config.from_options({"toca": {"reference": "pixart", "ratio": 0.2}})
    assert pixart.toca.ratio == 0.2 and pixart.toca.module_factors == {"self": 0.0, "cross": 0.6, "mlp": 1.6}
    assert pixart.toca.cfg_shared and pixart.toca.uniform_cell == (1, 4, 4)


@pytest.mark.parametrize("bad, message", [
    ({"interval": 0}, "toca.interval must be a whole number of steps"),
    ({"intervals": {"attn": 2}}, "unknown module kind"),
    ({"module_factors": {"self": 0.5}}, "self-attention is reused whole"),
    ({"ratio": 1.5}, "fraction of rows recomputed"),
    ({"reference": "flux"}, "toca.reference='flux' is not valid"),
    ({"uniform_cell": [2, 2]}, "three integers"),
])
def test_bad_toca_options_say_what_to_change(bad, message):
    with pytest.raises(ValueError, match=message):
        Config.from_options({"toca": bad})


def test_codebook_values_are_checked():
    with pytest.raises(ValueError, match="rates must be integers >= 1"):
        Config.from_options({"adacache": {"codebook": {0.1: 0}}})


def test_config_object_and_mode_pass_through():
    cfg = Config.from_options(preset_config("quality"), mode="max-autotune")
    assert cfg.preset == "quality" and cfg.mode == "max-autotune" and cfg.adacache.enabled


def test_options_of_wrong_type():
    with pytest.raises(ValueError, match="must be a dict or ditopt.Config"):
        Config.from_options(["preset", "fast"])


def test_codebook_thresholds_from_json_strings():
    cfg = Config.from_options({"adacache": {"codebook": {"0.1": 3, "inf": 1}}})
    assert cfg.adacache.codebook == {0.1: 3, float("inf"): 1}
    with pytest.raises(ValueError, match="is not a number"):
        Config.from_options({"adacache": {"codebook": {"fast": 3}}})
