"""The trajectory recorder: what an optimizer writes to its log as it runs.

It opens the log before the first weight changes (the header carries the hash of the starting
weights), collects the in-place passes of a step as (query, coefficient) terms, appends one
record per optimizer step, syncs the log when a checkpoint is written, and closes a finished
run with an end record holding the hash of the final weights (``finish``), so a replay can
tell a complete log from a cut one and check that it arrived at the same weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .trajectory import TrajectoryWriter

__all__ = ["Recorder"]


class Recorder:
    """Writes one optimizer's trajectory to ``path`` (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.writer: TrajectoryWriter | None = None
        self.shifts: list[list[list[float]]] = []

    @property
    def is_open(self) -> bool:
        return self.writer is not None

    def open(self, header: dict[str, Any], start_step: int) -> None:
        if self.writer is None:
            header = json.loads(json.dumps(header))  # the form it takes in the log (tuples -> lists)
            self.writer = TrajectoryWriter(self.path, header, start_step)

    def shift(self, queries_and_coeffs: Sequence[tuple[int, float]]) -> None:
        """Note one in-place pass of the current step (its own terms, by query index)."""
        self.shifts.append([[q, c] for q, c in queries_and_coeffs])

    def step(
        self,
        step: int,
        *,
        grads: Sequence[float],
        lrs: Sequence[float],
        wds: Sequence[float],
        skipped: bool,
        clipped: bool,
    ) -> None:
        if self.writer is not None:
            self.writer.append(
                {
                    "step": step,
                    "grads": [] if skipped else [float(g) for g in grads],
                    "lr": [float(v) for v in lrs],
                    "wd": [float(v) for v in wds],
                    "shifts": self.shifts,
                    "skipped": skipped,
                    "clipped": clipped,
                }
            )
        self.shifts = []

    def sync(self) -> None:
        if self.writer is not None:
            self.writer.sync()

    def close(self, final_hash: str | None = None) -> None:
        """Close the log; with ``final_hash`` (the run finished) write the end record first."""
        if self.writer is None:
            return
        if final_hash is not None and hasattr(self.writer, "finish"):
            self.writer.finish(final_hash)
        else:
            self.writer.close()
        self.writer = None
