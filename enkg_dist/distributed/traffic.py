"""What the driver carries: bytes of array data it sends to Ray actors as task arguments and receives back from
them (`ray.get`). Counted where the driver hands arrays to Ray or takes them back (prior actors, simulator workers),
for the Ray benchmark's bytes-per-step figure; object references cost a few dozen bytes and are not counted."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Traffic:
    sent: int = 0  # bytes of arrays in task arguments
    received: int = 0  # bytes of arrays fetched by the driver

    def reset(self) -> None:
        self.sent = self.received = 0


DRIVER = Traffic()


def nbytes(*objs) -> int:
    """Bytes of the numpy arrays among `objs` (other values count nothing)."""
    return sum(o.nbytes for o in objs if isinstance(o, np.ndarray))
