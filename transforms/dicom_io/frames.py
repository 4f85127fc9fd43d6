"""Frame-grid arithmetic of a tiled level, in one place: which frames a region overlaps.

A TILED_FULL level of `width` x `height` pixels is stored as frames of `frame_width` x
`frame_height`, row-major, numbered from 1; frame (row, col) covers x in
[col * frame_width, (col + 1) * frame_width) and y likewise. The patch reader, the batched
frame fetchers and the benchmark all use these functions, so they agree on every frame.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FrameGrid:
    width: int
    height: int
    frame_width: int
    frame_height: int

    @classmethod
    def of(cls, level: Any) -> FrameGrid:
        """The grid of an ez-wsi level (a resized level's source level)."""
        level = getattr(level, "source_level", level)
        return cls(level.width, level.height, level.frame_width, level.frame_height)

    @functools.cached_property
    def per_row(self) -> int:
        """Frames per row of the level."""
        return -(-self.width // self.frame_width)

    @property
    def count(self) -> int:
        """Frames in the level (TILED_FULL)."""
        return self.per_row * -(-self.height // self.frame_height)

    def number(self, row: int, col: int) -> int:
        """The 1-based frame number of frame (row, col)."""
        return row * self.per_row + col + 1

    def row_col(self, number: int) -> tuple[int, int]:
        """(row, col) of a 1-based frame number."""
        return divmod(number - 1, self.per_row)

    def columns(self, x: int, width: int) -> range:
        """Frame columns that pixels [x, x + width) overlap."""
        return range(x // self.frame_width, (x + width - 1) // self.frame_width + 1)

    def rows(self, y: int, height: int) -> range:
        """Frame rows that pixels [y, y + height) overlap."""
        return range(y // self.frame_height, (y + height - 1) // self.frame_height + 1)

    def region_numbers(self, x: int, y: int, width: int, height: int) -> list[int]:
        """1-based numbers of the frames a region overlaps, clipped to the level."""
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + width), min(self.height, y + height)
        if x1 <= x0 or y1 <= y0:
            return []
        return [
            self.number(row, col)
            for row in self.rows(y0, y1 - y0)
            for col in self.columns(x0, x1 - x0)
        ]
