"""Options of the ditopt backend: the core settings, one section per method, presets, validation.

`Config.from_options` is the single entry point from `torch.compile(...,
options=...)`.  Every key and value is checked; a bad one raises ValueError
naming what is valid, so a typo never silently turns a method off.  The method
sections come from the method list (`ditopt.passes.pipeline.METHODS`): each method's
config dataclass validates itself.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .checks import check_choice
from .method import Method, configure

LOWERINGS = ("inductor", "aot_eager", "eager")
FUSE_MODES = ("block", "all", "none")  # lowering.fuse_regions
DEFAULT_PRESET = "balanced"

# Presets are options, chosen by `ditopt.tune` on the fixture (examples/choose_presets.py, docs/benchmarks.md):
# on split A (prompts 0-3, seeds 0, 1) the fastest configuration whose worst-seed PSNR against full compute
# is >= floor + 2 dB, for floors 35 (quality), 30 (balanced) and 25 dB (fast); the 2 dB margin is the
# smallest of 1..6 dB with which every preset keeps its floor on split B (prompts 4-7, seeds 2, 3); split C
# (prompts 8-11, seeds 4, 5) chose nothing and reports them.  The search covered AdaCache and TeaCache at
# every forecast order, ToCa and AsymRnR: AdaCache won each floor.
PRESET_OPTIONS: dict[str, dict] = {
    "lossless": {"invariants": True},
    "quality": {"invariants": True,
                "adacache": {"codebook": {0.028901: 6, 0.057802: 5, 0.086703: 4, 0.115604: 3, 0.144504: 2,
                                          math.inf: 1}, "forecast": 1}},
    "balanced": {"invariants": True,
                 "adacache": {"codebook": {0.039164: 6, 0.078328: 5, 0.117492: 4, 0.156655: 3, 0.195819: 2,
                                           math.inf: 1}, "forecast": 0}},
    "fast": {"invariants": True,
             "adacache": {"codebook": {0.077427: 6, 0.154854: 5, 0.232281: 4, 0.309708: 3, 0.387136: 2,
                                       math.inf: 1}, "forecast": 1}},
}
PRESETS = tuple(PRESET_OPTIONS)
CORE_OPTIONS = ("config", "preset", "lowering", "mode", "fuse_regions", "export_dir", "max_cache_mb")


def methods() -> tuple[Method, ...]:
    from ditopt.passes.pipeline import METHODS

    return METHODS


def _all_off() -> dict[str, Any]:
    return {m.name: m.config_type(enabled=False) for m in methods()}


@dataclass
class Config:
    """Everything the backend needs to know; build it with `Config.from_options`.

    `config.<method name>` is that method's section (e.g. `config.adacache.codebook`)."""

    preset: str = DEFAULT_PRESET
    methods: dict[str, Any] = field(default_factory=_all_off)  # method name -> its config, in pipeline order
    lowering: str = "inductor"
    mode: str | None = None  # passed to Inductor
    # compile neighbouring regions no hook separates as one (Hook.cuts): "block" (within a block and the glue
    # around it: depth-independent compile time), "all" (as far as the hooks allow) or "none"
    fuse_regions: str = "block"
    export_dir: Path | None = None
    # the most the methods' caches of one compiled graph may hold, all streams together (None: no bound); over
    # it, the method holding most gives something up, in a stated way (Hook.shed), and says so once
    max_cache_mb: float | None = None

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("methods")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"ditopt Config has no setting or method {name!r}")

    @property
    def lossless(self) -> bool:
        """No enabled method approximates (step-invariant caching is exact)."""
        return all(m.exact for m, _ in self.enabled())

    def enabled(self) -> list[tuple[Method, Any]]:
        """(method, its config) for every enabled method, in pipeline order."""
        return [(m, self.methods[m.name]) for m in methods() if self.methods[m.name].enabled]

    @classmethod
    def from_options(cls, options: "Config | Mapping[str, Any] | None" = None, mode: str | None = None) -> "Config":
        """Validate torch.compile options (a dict, a Config or None) into a Config."""
        if isinstance(options, Config):
            cfg = dataclasses.replace(options, methods=dict(options.methods))
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
        check_choice("preset", self.preset, PRESETS)
        check_choice("lowering", self.lowering, LOWERINGS)
        check_choice("fuse_regions", self.fuse_regions, FUSE_MODES)
        if self.max_cache_mb is not None and (isinstance(self.max_cache_mb, bool)
                                              or not isinstance(self.max_cache_mb, (int, float))
                                              or self.max_cache_mb < 0):
            raise ValueError(f"ditopt: max_cache_mb must be a number of MiB >= 0 (or None), got {self.max_cache_mb!r}")
        for method, cfg in self.enabled():
            cfg.validate()
            clash = [c for c in method.conflicts if self.methods[c].enabled]
            if clash:
                raise ValueError(f"ditopt: {method.name} and {clash[0]} both decide which blocks to skip; enable "
                                 f"one (e.g. {{'preset': 'lossless', {method.name!r}: {{...}}}}, or "
                                 f"{{{clash[0]!r}: False}})")

    def to_dict(self) -> dict:
        out = {"preset": self.preset, "lowering": self.lowering, "mode": self.mode, "fuse_regions": self.fuse_regions,
               "export_dir": str(self.export_dir) if self.export_dir else None, "max_cache_mb": self.max_cache_mb}
        for name, cfg in self.methods.items():
            out[name] = _json_keys(dataclasses.asdict(cfg))
        return out


def _json_keys(value: Any) -> Any:
    """Dict keys as strings (codebook thresholds, tier maps), so the result is JSON."""
    if isinstance(value, dict):
        return {str(k): _json_keys(v) for k, v in value.items()}
    return value


def preset_config(name: str) -> Config:
    """The Config a preset expands to (docs/benchmarks.md says how each was chosen)."""
    check_choice("preset", name, PRESETS)
    cfg = Config(preset=name)
    by_name = {m.name: m for m in methods()}
    for method_name, settings in PRESET_OPTIONS[name].items():
        cfg.methods[method_name] = configure(by_name[method_name], settings, cfg.methods[method_name])
    return cfg


def _from_mapping(options: Mapping[str, Any]) -> Config:
    if options.get("config") is not None:  # a JSON file of options (e.g. what `ditopt tune` wrote); keys here win
        from .tune import load_config

        loaded = load_config(options["config"])
        options = {**loaded, **{k: ({**loaded[k], **v} if isinstance(v, Mapping) and isinstance(loaded.get(k), Mapping)
                                    else v) for k, v in options.items() if k != "config"}}
    all_methods = methods()
    valid = (*CORE_OPTIONS, *(m.name for m in all_methods))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"ditopt: unknown option(s) {unknown}; valid options: {list(valid)}")
    preset = options.get("preset", DEFAULT_PRESET)
    if not isinstance(preset, str):
        raise ValueError(f"ditopt: preset must be one of {list(PRESETS)}, got {preset!r}")
    cfg = preset_config(preset)
    for method in all_methods:
        if method.name in options:
            cfg.methods[method.name] = configure(method, options[method.name], cfg.methods[method.name])
    if "lowering" in options:
        cfg.lowering = options["lowering"]
    if "mode" in options:
        cfg.mode = options["mode"]
    if "fuse_regions" in options:
        cfg.fuse_regions = options["fuse_regions"]
    if options.get("export_dir") is not None:
        cfg.export_dir = Path(options["export_dir"])
    if "max_cache_mb" in options:
        cfg.max_cache_mb = options["max_cache_mb"]
    return cfg
