"""Options of the ditopt backend: dataclasses, presets and validation.

`Config.from_options` is the single entry point from `torch.compile(...,
options=...)`.  Every key and value is checked; a bad one raises ValueError
naming what is valid, so a typo never silently turns a method off.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

LOWERINGS = ("inductor", "aot_eager", "eager")
PRESETS = ("lossless", "quality", "balanced", "fast")
DEFAULT_PRESET = "balanced"

# AdaCache codebooks chosen by measurement on the fixture (examples/choose_presets.py, docs/benchmarks.md):
# the fastest codebook whose worst-seed PSNR against full compute stays >= 35 dB (quality), >= 30 dB
# (balanced) and >= 25 dB (fast).
PRESET_CODEBOOKS = {
    "quality": {0.026782: 6, 0.053565: 5, 0.080347: 4, 0.10713: 3, 0.133912: 2, math.inf: 1},
    "balanced": {0.054798: 6, 0.109597: 5, 0.164395: 4, 0.219193: 3, 0.273991: 2, math.inf: 1},
    "fast": {0.09524: 6, 0.19048: 5, 0.28572: 4, 0.380961: 3, 0.476201: 2, math.inf: 1},
}


@dataclass
class AdaCacheConfig:
    """Adaptive block skipping (AdaCache, with optional motion regularisation).

    codebook maps metric thresholds to the number of steps until the next
    computed step: in ascending order, the first threshold above the metric
    wins; above all of them, the last rate applies.
    """

    enabled: bool = False
    policy: str = "adacache"  # or "teacache": decide before each step from the first block's modulated input
    codebook: dict = field(default_factory=lambda: {0.08: 6, 0.16: 5, 0.24: 4, 0.32: 3, 0.40: 2, 1.0: 1})
    probe_block: int | None = None  # None: the middle (temporal, if any) block
    moreg: bool = False
    moreg_window: tuple[float, float] = (0.13, 0.87)  # fraction of the steps
    first_steps: int = 2
    last_steps: int = 2
    num_steps: int | None = None  # steps per generation, if known; otherwise read from the timesteps
    teacache_threshold: float = 0.1  # accumulated rescaled change that forces a computed step
    teacache_coefficients: tuple = (1.0, 0.0)  # rescaling polynomial, highest power first (identity)


@dataclass
class AsymRnRConfig:
    """Asymmetric token reduction inside video self-attention (AsymRnR); see docs/asymrnr.md.

    schedule "fixed": q_ratio / kv_ratio everywhere.  "table": per-(block, step) ratios from
    q_table / kv_table, or from a redundancy-tier table `tiers` and the tier -> ratio maps
    q_tiers / kv_tiers (the reference's format: a tier >= key gets that ratio).  "adaptive":
    ditopt measures the redundancy of Q and of K/V at each matching refresh and uses the largest
    of `levels` below the measured redundant fraction, capped by q_ratio / kv_ratio.
    """

    enabled: bool = False
    q_ratio: float = 0.5  # fraction of video query tokens removed (the cap, for "adaptive")
    kv_ratio: float = 0.3  # fraction of video key/value tokens removed
    schedule: str = "fixed"
    q_table: list | None = None  # [block][step] -> ratio; steps past the end use the last entry
    kv_table: list | None = None
    tiers: list | None = None  # [block][step] -> redundancy tier
    q_tiers: dict = field(default_factory=dict)  # tier threshold -> ratio
    kv_tiers: dict = field(default_factory=dict)
    levels: tuple = (0.0, 0.25, 0.5, 0.75)  # ratios the adaptive schedule may choose
    adaptive_threshold: float = 0.1  # relative distance below which a source counts as redundant
    match_every: int = 5  # steps a match is reused before it is recomputed with a fresh split
    stride: tuple = (2, 2, 2)  # (frames, height, width) of the cells that each hold one destination
    metric: str = "euclidean"
    reduce_mode: str = "replace"  # or "mean"
    kv_match_on: str = "v"  # K and V share one matching, computed on V (or "k")
    seed: int = 0


@dataclass
class ToCaConfig:
    """Token-wise caching of self-attention, cross-attention and MLP outputs (ToCa); see docs/toca.md.

    A site is computed fully at the first `first_fresh` steps and every `interval`-th step (per module
    kind with `intervals`, e.g. {"cross": 6}); at the other steps self-attention reads its cache and
    cross-attention and MLP recompute the top-scored fraction `ratio * step factor * layer factor *
    module_factors[kind]` of their rows.  A factor with weight w at position x in [0, 1] is
    1 + w - 2 w x; the step position is the noise level (t / first t: 1 at the start), the layer
    position is block / (blocks - 1).  `reference` fills every setting from the published ones.
    """

    enabled: bool = False
    reference: str | None = None  # "dit", "pixart" or "opensora": the reference's settings for that model
    interval: int = 3
    intervals: dict = field(default_factory=dict)  # module kind ("self", "cross", "mlp") -> its own interval
    first_fresh: int = 1
    ratio: float = 0.1  # r0: the base fraction of rows recomputed at partial steps
    step_weight: float = 0.0
    layer_weight: float = 0.0
    module_factors: dict = field(default_factory=lambda: {"self": 0.0, "cross": 1.0, "mlp": 1.0})
    score: str = "auto"  # "auto": s2 (cross-attention entropy) where a block has cross-attention, else s1; "self": s1;
    # "none": no attention score (s3 and s4 only), which costs nothing at fresh steps
    age_weight: float = 0.25  # s3: + age_weight * (steps since computed) / interval
    uniform_cell: tuple = (1, 2, 2)  # s4: cells of (frames, height, width) tokens ...
    uniform_bonus: float = 0.0  # ... whose best token's score is multiplied by (1 + bonus); 0 turns s4 off
    cfg_shared: bool = False  # the two batch halves (CFG's uncond/cond) select the same rows
    levels: int = 16  # the recomputed fraction is rounded up to a multiple of 1/levels ...
    row_multiple: int = 8  # ... and the row count up to a multiple of this: few, static shapes


# The reference implementation's settings (Shenyi-Z/ToCa), as docs/toca.md describes them.
TOCA_REFERENCES = {
    "dit": dict(interval=3, first_fresh=1, ratio=0.07, step_weight=0.4, layer_weight=0.8,
                module_factors={"self": 0.0, "cross": 1.0, "mlp": 2.5}, score="self",
                uniform_cell=(1, 2, 2), uniform_bonus=0.6, cfg_shared=False),
    "pixart": dict(interval=3, first_fresh=1, ratio=0.30, step_weight=0.9, layer_weight=0.6,
                   module_factors={"self": 0.0, "cross": 0.6, "mlp": 1.6}, score="auto",
                   uniform_cell=(1, 4, 4), uniform_bonus=0.4, cfg_shared=True),
    "opensora": dict(interval=3, intervals={"self": 3, "cross": 6, "mlp": 3}, first_fresh=3, ratio=0.10,
                     step_weight=0.0, layer_weight=0.0, module_factors={"self": 0.0, "cross": 0.0, "mlp": 1.495},
                     score="auto", uniform_bonus=0.0, cfg_shared=True),
}
TOCA_KINDS = ("self", "cross", "mlp")


METHOD_SECTIONS: dict[str, type] = {"asymrnr": AsymRnRConfig, "toca": ToCaConfig, "adacache": AdaCacheConfig}


@dataclass
class Config:
    """Everything the backend needs to know; build it with `Config.from_options`."""

    preset: str = DEFAULT_PRESET
    asymrnr: AsymRnRConfig = field(default_factory=AsymRnRConfig)
    toca: ToCaConfig = field(default_factory=ToCaConfig)
    adacache: AdaCacheConfig = field(default_factory=AdaCacheConfig)
    lowering: str = "inductor"
    mode: str | None = None  # passed to Inductor
    export_dir: Path | None = None

    @property
    def lossless(self) -> bool:
        return not any(getattr(self, name).enabled for name in METHOD_SECTIONS)

    @classmethod
    def from_options(cls, options: "Config | Mapping[str, Any] | None" = None, mode: str | None = None) -> "Config":
        """Validate torch.compile options (a dict, a Config or None) into a Config."""
        if isinstance(options, Config):
            cfg = dataclasses.replace(options)
        elif options is None:
            cfg = preset_config(DEFAULT_PRESET)
        elif isinstance(options, Mapping):
            cfg = _from_mapping(options)
        else:
            raise ValueError(f"ditopt options must be a dict or ditopt.Config, got {type(options).__name__}")
        if mode is not None:
            cfg.mode = mode
        cfg.validate()
        return cfg

    def validate(self) -> None:
        _check_choice("preset", self.preset, PRESETS)
        _check_choice("lowering", self.lowering, LOWERINGS)
        _validate_adacache(self.adacache)
        _validate_asymrnr(self.asymrnr)
        _validate_toca(self.toca)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["export_dir"] = str(self.export_dir) if self.export_dir else None
        out["adacache"]["codebook"] = {str(k): v for k, v in self.adacache.codebook.items()}  # JSON keys
        for key in ("q_tiers", "kv_tiers"):
            out["asymrnr"][key] = {str(k): v for k, v in self.asymrnr.__dict__[key].items()}
        return out


def preset_config(name: str) -> Config:
    """The Config a preset expands to (see docs/presets.md for how each was chosen)."""
    _check_choice("preset", name, PRESETS)
    cfg = Config(preset=name)
    if name != "lossless":
        cfg.adacache = AdaCacheConfig(enabled=True, codebook=dict(PRESET_CODEBOOKS[name]))
    return cfg


def _from_mapping(options: Mapping[str, Any]) -> Config:
    valid = ("preset", *METHOD_SECTIONS, "lowering", "mode", "export_dir")
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"ditopt: unknown option(s) {unknown}; valid options: {list(valid)}")
    preset = options.get("preset", DEFAULT_PRESET)
    cfg = preset_config(preset)
    for name, section_type in METHOD_SECTIONS.items():
        if name in options:
            setattr(cfg, name, _section(name, section_type, options[name], getattr(cfg, name)))
    if "lowering" in options:
        cfg.lowering = options["lowering"]
    if "mode" in options:
        cfg.mode = options["mode"]
    if options.get("export_dir") is not None:
        cfg.export_dir = Path(options["export_dir"])
    return cfg


def _section(name: str, section_type: type, value: Any, base: Any):
    if value is False or value is None:
        return section_type(enabled=False)
    if value is True:
        return dataclasses.replace(base, enabled=True)
    if not isinstance(value, Mapping):
        raise ValueError(f"ditopt: option {name!r} must be a dict of settings, True or False; got {value!r}")
    valid = [f.name for f in fields(section_type)]
    unknown = sorted(set(value) - set(valid))
    if unknown:
        raise ValueError(f"ditopt: unknown key(s) {unknown} in {name!r}; valid keys: {valid}")
    settings = {"enabled": True, **value}
    if name == "toca" and settings.get("reference") is not None:  # the reference's settings, then the user's
        _check_choice("toca.reference", settings["reference"], tuple(TOCA_REFERENCES))
        settings = {**TOCA_REFERENCES[settings["reference"]], **settings}
    if "module_factors" in settings and isinstance(settings["module_factors"], Mapping):  # kinds not named keep theirs
        settings["module_factors"] = {**base.module_factors, **settings["module_factors"]}
    if "codebook" in settings and isinstance(settings["codebook"], Mapping):
        settings["codebook"] = {_threshold(k): v for k, v in settings["codebook"].items()}
    for key in ("q_tiers", "kv_tiers"):  # tier thresholds may be JSON strings too
        if key in settings and isinstance(settings[key], Mapping):
            settings[key] = {_threshold(k): v for k, v in settings[key].items()}
    for key in ("stride", "levels", "uniform_cell"):
        if key in settings and isinstance(settings[key], list) and key in {f.name for f in fields(section_type)}:
            settings[key] = tuple(settings[key])
    return dataclasses.replace(base, **settings)


def _threshold(key: Any) -> Any:
    """Codebook thresholds may come as strings from JSON ("0.08", "inf"); numbers otherwise stay."""
    if isinstance(key, str):
        try:
            return float(key)
        except ValueError:
            raise ValueError(f"ditopt: adacache.codebook threshold {key!r} is not a number") from None
    return key


def _validate_adacache(cfg: AdaCacheConfig) -> None:
    _check_choice("adacache.policy", cfg.policy, ("adacache", "teacache"))
    if cfg.teacache_threshold <= 0:
        raise ValueError("ditopt: adacache.teacache_threshold must be > 0")
    if not cfg.teacache_coefficients or not all(isinstance(c, (int, float)) for c in cfg.teacache_coefficients):
        raise ValueError("ditopt: adacache.teacache_coefficients must be a non-empty sequence of numbers")
    if not cfg.codebook:
        raise ValueError("ditopt: adacache.codebook must map at least one threshold to a rate")
    for threshold, rate in cfg.codebook.items():
        if not isinstance(threshold, (int, float)) or threshold < 0:
            raise ValueError(f"ditopt: adacache.codebook thresholds must be numbers >= 0, got {threshold!r}")
        if not isinstance(rate, int) or rate < 1:
            raise ValueError(f"ditopt: adacache.codebook rates must be integers >= 1, got {rate!r} for {threshold}")
    lo, hi = cfg.moreg_window
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"ditopt: adacache.moreg_window must be two fractions 0 <= lo <= hi <= 1, got {cfg.moreg_window}")
    if cfg.first_steps < 1 or cfg.last_steps < 0:
        raise ValueError("ditopt: adacache.first_steps must be >= 1 and last_steps >= 0")
    if cfg.num_steps is not None and cfg.num_steps < 1:
        raise ValueError("ditopt: adacache.num_steps must be a positive number of steps or None")


def _validate_asymrnr(cfg: AsymRnRConfig) -> None:
    _check_choice("asymrnr.schedule", cfg.schedule, ("fixed", "table", "adaptive"))
    _check_choice("asymrnr.metric", cfg.metric, ("euclidean", "cosine", "dot"))
    _check_choice("asymrnr.reduce_mode", cfg.reduce_mode, ("replace", "mean"))
    _check_choice("asymrnr.kv_match_on", cfg.kv_match_on, ("k", "v"))
    for name in ("q_ratio", "kv_ratio"):
        _check_ratio(f"asymrnr.{name}", getattr(cfg, name))
    for level in cfg.levels:
        _check_ratio("asymrnr.levels", level)
    if cfg.match_every < 1:
        raise ValueError(f"ditopt: asymrnr.match_every must be >= 1 step, got {cfg.match_every}")
    if len(cfg.stride) != 3 or not all(isinstance(s, int) and s >= 1 for s in cfg.stride):
        raise ValueError(f"ditopt: asymrnr.stride must be three integers >= 1 (frames, height, width), got {cfg.stride}")
    if cfg.schedule == "adaptive" and cfg.metric == "dot":
        raise ValueError("ditopt: the adaptive asymrnr schedule needs metric 'euclidean' or 'cosine'")
    if cfg.schedule == "table":
        if cfg.tiers is not None:
            if cfg.q_table is not None or cfg.kv_table is not None:
                raise ValueError("ditopt: give asymrnr either tiers (+ q_tiers/kv_tiers) or q_table/kv_table, not both")
            _check_table("asymrnr.tiers", cfg.tiers, lambda v: isinstance(v, (int, float)))
            for name in ("q_tiers", "kv_tiers"):
                for ratio in getattr(cfg, name).values():
                    _check_ratio(f"asymrnr.{name}", ratio)
        elif cfg.q_table is None and cfg.kv_table is None:
            raise ValueError("ditopt: asymrnr.schedule 'table' needs q_table and/or kv_table, or tiers with q_tiers/kv_tiers")
        for name in ("q_table", "kv_table"):
            if getattr(cfg, name) is not None:
                _check_table(f"asymrnr.{name}", getattr(cfg, name), lambda v: isinstance(v, (int, float)) and 0 <= v < 1)


def _validate_toca(cfg: ToCaConfig) -> None:
    if cfg.reference is not None:
        _check_choice("toca.reference", cfg.reference, tuple(TOCA_REFERENCES))
    _check_choice("toca.score", cfg.score, ("auto", "self", "none"))
    for name, value in [("interval", cfg.interval), *((f"intervals[{k!r}]", v) for k, v in cfg.intervals.items())]:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"ditopt: toca.{name} must be a whole number of steps >= 1, got {value!r}")
    for table in ("intervals", "module_factors"):
        unknown = sorted(set(getattr(cfg, table)) - set(TOCA_KINDS))
        if unknown:
            raise ValueError(f"ditopt: toca.{table} has unknown module kind(s) {unknown}; use {list(TOCA_KINDS)}")
    if cfg.module_factors.get("self", 0.0) != 0.0:
        raise ValueError("ditopt: toca.module_factors['self'] must be 0: self-attention is reused whole at partial "
                         "steps (recomputing part of it spreads errors, as the ToCa paper found)")
    if any(not isinstance(v, (int, float)) or v < 0 for v in cfg.module_factors.values()):
        raise ValueError(f"ditopt: toca.module_factors must be numbers >= 0, got {cfg.module_factors}")
    if not isinstance(cfg.ratio, (int, float)) or not 0.0 <= cfg.ratio <= 1.0:
        raise ValueError(f"ditopt: toca.ratio is the fraction of rows recomputed at partial steps, 0 <= ratio <= 1; "
                         f"got {cfg.ratio!r}")
    for name in ("step_weight", "layer_weight"):
        if not -1.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"ditopt: toca.{name} must lie in [-1, 1] (factor 1 + w - 2 w x stays >= 0)")
    if cfg.first_fresh < 1:
        raise ValueError("ditopt: toca.first_fresh must be >= 1 (the first step fills the cache)")
    if cfg.age_weight < 0 or cfg.uniform_bonus < 0:
        raise ValueError("ditopt: toca.age_weight and toca.uniform_bonus must be >= 0")
    if len(cfg.uniform_cell) != 3 or not all(isinstance(c, int) and c >= 1 for c in cfg.uniform_cell):
        raise ValueError(f"ditopt: toca.uniform_cell must be three integers >= 1 (frames, height, width), "
                         f"got {cfg.uniform_cell}")
    if cfg.levels < 1 or cfg.row_multiple < 1:
        raise ValueError("ditopt: toca.levels and toca.row_multiple must be >= 1")


def _check_ratio(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"ditopt: {name} must be a fraction of tokens removed, 0 <= ratio < 1; got {value!r}")


def _check_table(name: str, table: Any, valid) -> None:
    if not isinstance(table, (list, tuple)) or not table or not all(
            isinstance(row, (list, tuple)) and row and all(valid(v) for v in row) for row in table):
        raise ValueError(f"ditopt: {name} must be a non-empty list per block of non-empty lists per step of "
                         f"valid values; got {table!r}")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"ditopt: {name}={value!r} is not valid; choose one of {list(choices)}")
