import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def _fields():
    import dataclasses

    from ditopt.passes.pipeline import METHODS

    return [(m.name, f.name) for m in METHODS for f in dataclasses.fields(m.config_type) if f.name != "enabled"]


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(_fields()),
       value=st.one_of(st.text(max_size=3), st.integers(-3, 3), st.floats(allow_nan=False, allow_infinity=False),
                       st.booleans(), st.none(), st.lists(st.integers(0, 3), max_size=3),
                       st.dictionaries(st.sampled_from(["self", "x", "0.1"]), st.integers(0, 3), max_size=2)))
def test_any_value_for_any_method_field_is_accepted_or_a_value_error(field, value):
    section, key = field
    try:
        Config.from_options({section: {key: value}})
    except ValueError as err:
        assert "ditopt:" in str(err)


@pytest.mark.parametrize("section, key", [f for f in _fields()])
def test_a_string_for_a_non_string_field_names_the_field(section, key):
    import dataclasses

    from ditopt.passes.pipeline import METHODS

    annotation = next(f.type for m in METHODS if m.name == section for f in dataclasses.fields(m.config_type)
                      if f.name == key)
    if "str" in str(annotation):
        pytest.skip("a string field")
    with pytest.raises(ValueError, match=f"{section}.{key}"):
        Config.from_options({section: {key: "2"}})
