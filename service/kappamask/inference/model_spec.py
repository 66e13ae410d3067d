"""What a model declares about itself: the one description shared by the repository
(which writes it into config.pbtxt) and the client (which reads it back from Triton)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """A KappaMask model: Triton name, level, input features in order, their max_v, version."""

    name: str
    level: str
    features: tuple[str, ...]
    max_v: tuple[float, ...]
    version_label: str
