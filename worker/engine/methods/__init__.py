"""The method registry: adding a method is one file here plus its name in `worker.spec`."""

from __future__ import annotations

from worker.engine.methods.base import MethodParams, PruningMethod
from worker.engine.methods.breadcrumbs import Breadcrumbs
from worker.engine.methods.dare import Dare
from worker.engine.methods.fapm import Fapm
from worker.engine.methods.magnitude import Magnitude
from worker.engine.methods.nps import Nps
from worker.engine.methods.random import RandomSubset

REGISTRY: dict[str, PruningMethod] = {
    m.name: m for m in (Fapm(), Magnitude(), RandomSubset(), Dare(), Breadcrumbs(), Nps())
}


def get_method(name: str) -> PruningMethod:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"method: unknown method {name!r}; choose from {sorted(REGISTRY)}"
        ) from None


__all__ = ["REGISTRY", "MethodParams", "PruningMethod", "get_method"]
