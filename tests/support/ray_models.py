"""Backends for the Ray Serve routing tests: the toy engine with a prefix cache, slowed
down by a fixed sleep per engine step so a stream lasts long enough to kill its replica."""
from __future__ import annotations

import time
from typing import Any

from tep.backends.toy import ToyBackend, ToyModel
from tep.engine import EngineBackend


class _SlowToyModel(ToyModel):
    def __init__(self, *args: Any, step_delay_s: float = 0.0, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.step_delay_s = step_delay_s

    def forward(self, batch: Any) -> Any:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)   # releases the GIL, like a real forward
        return super().forward(batch)


def SlowToyEngineBackend(model: str = "tep-toy", *, step_delay_s: float = 0.002,  # noqa: N802
                         prefix_cache: int = 64, max_num_seqs: int = 16) -> EngineBackend:
    """The toy model (prefix cache of ``prefix_cache`` finished sequences) on the engine,
    sleeping ``step_delay_s`` per step."""
    m = _SlowToyModel(ToyBackend(model), max_num_seqs=max_num_seqs,
                      prefix_cache=prefix_cache, step_delay_s=step_delay_s)
    return EngineBackend(m, max_num_seqs=max_num_seqs)
