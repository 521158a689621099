"""Write what ditopt did to a folder: graph code before and after each pass and after lowering,
and a JSON report of the structure found and of each pass's matches."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch.fx as fx

_GRAPH_IDS = itertools.count()


class Exporter:
    """One compiled graph's export folder, `<export_dir>/graph_<n>/`; a no-op without export_dir."""

    def __init__(self, export_dir: Path | None):
        self.dir = None
        self.report: dict = {}
        self._step = itertools.count()
        if export_dir is not None:
            self.dir = Path(export_dir) / f"graph_{next(_GRAPH_IDS):03d}"
            self.dir.mkdir(parents=True, exist_ok=True)

    def graph(self, stage: str, gm: fx.GraphModule) -> None:
        if self.dir is not None:
            (self.dir / f"{next(self._step):02d}_{stage}.py").write_text(gm.code)

    def lowered(self, regions, fused=None) -> None:
        """The regions in execution order, then each run of them the runtime compiles as one (fused)."""
        if self.dir is None:
            return
        from .lowering import graph_key

        lines = ["# Regions in execution order. Regions that compute the same thing share one compiled variant.", ""]
        seen: dict[tuple, str] = {}
        for r in [*regions, *(fused or {}).values()]:
            code = r.gm.code
            first = seen.setdefault(graph_key(r.gm), r.name)
            lines.append(f"# {r.name}: reads {len(r.inputs)} values, defines {len(r.outputs)}"
                         + (f"; same computation as {first}" if first != r.name else ""))
            if first == r.name:
                lines.append(f"class {r.name}:")
                lines.extend("    " + line for line in code.strip("\n").splitlines())
            lines.append("")
        (self.dir / f"{next(self._step):02d}_lowered.py").write_text("\n".join(lines))

    def write_report(self, **sections) -> None:
        self.report.update(sections)
        if self.dir is not None:
            (self.dir / "report.json").write_text(json.dumps(self.report, indent=2, default=str))
