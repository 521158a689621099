"""Step-invariant caching's options."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class InvariantsConfig:
    """Cache, per generation and stream, the values computed only from step-invariant inputs."""

    enabled: bool = False

    def validate(self) -> None:
        pass
