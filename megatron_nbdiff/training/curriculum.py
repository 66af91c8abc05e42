"""Block-size curriculum (docs/method.md, "Block-size curriculum"):
``B(s) = min(B_max, B_0 * r ** floor(max(0, s - s_0) / D))``, by default 1, 2, 4, ..., 32."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockCurriculum:
    """Geometric block-size growth; ``interval=0`` keeps ``start`` for ever."""

    start: int = 1
    """``B_0``, the block size at step ``s_0`` and before."""
    factor: int = 2
    """``r``, the growth factor per interval."""
    maximum: int = 32
    """``B_max``, the target block size."""
    interval: int = 500
    """``D``, steps between growths (0: constant ``start``)."""
    offset: int = 0
    """``s_0``, the step at which growth starts."""

    def __post_init__(self):
        for name in ("start", "factor", "maximum"):
            if getattr(self, name) < 1:
                raise ValueError(f"curriculum {name} must be >= 1, found {getattr(self, name)}")
        if self.interval < 0 or self.offset < 0:
            raise ValueError(
                f"curriculum interval and offset must be >= 0, found {self.interval}, {self.offset}"
            )
        if self.start > self.maximum:
            raise ValueError(f"curriculum start {self.start} exceeds maximum {self.maximum}")

    def block_size(self, step: int) -> int:
        if self.interval == 0:
            return self.start
        grown = max(0, step - self.offset) // self.interval
        size = self.start
        for _ in range(grown):  # integer growth, no float powers; stops at the cap
            if size >= self.maximum:
                break
            size *= self.factor
        return min(self.maximum, size)

    def schedule(self, steps: int) -> list[int]:
        """Block size of every step in ``[0, steps)``."""
        return [self.block_size(s) for s in range(steps)]

    def changes(self, steps: int) -> list[tuple[int, int]]:
        """(first step, block size) of each stage within ``[0, steps)``."""
        out: list[tuple[int, int]] = []
        for s in range(steps):
            b = self.block_size(s)
            if not out or out[-1][1] != b:
                out.append((s, b))
        return out
