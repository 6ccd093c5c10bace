"""Integrity and resume: where a step's full ensemble lives, whether it decodes, the newest intact step, the move of
the commit marker back to it, and the config check of a resume (a mixin of RunStore, which owns the arrays)."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from enkg_dist.store import layout as L

_MISSING = object()


class ResumePoints:
    """RunStore's integrity checks and resume points (uses its `_a`, `_marker`, `mode`, `path`, `is_kept`,
    `_write_marker`)."""

    _intact: int | None
    damage: str | None

    def _verify(self, on_damage: str) -> None:
        """Check the newest ensemble; in mode "a", move the marker back to it (the steps after it are replayed)."""
        s = self._marker["ensemble_step"]
        problem = self.check_step(s) if s >= 0 else None
        if problem is None:
            self._intact = s
            if self.mode == "a" and s < self.committed_step:
                self._rollback(s)
            return
        self.damage = problem[0]
        if on_damage == "raise":
            raise L.StoreIntegrityError(*problem)
        s = self.last_intact_step()
        warnings.warn(f"{problem[0]}; falling back to step {s}", stacklevel=3)
        if self.mode == "a":
            self._rollback(s)

    def _rollback(self, step: int) -> None:
        """Move the commit marker back to `step` and forget resume slots of later (abandoned) steps."""
        stamps = self._a["resume/step"]
        for slot in (0, 1):
            try:
                if stamps[slot] > step:
                    stamps[slot] = -1
            except Exception:  # a damaged stamp: the slot is untrusted anyway
                stamps[slot] = -1
        self._write_marker(step, self._slot_of(step), step)
        self._next_step = step + 1


    def _source(self, step: int) -> tuple[str, int] | None:
        """Where step's full ensemble lives: ("particles", step) or ("resume/particles", slot), or None."""
        if self.is_kept(step):
            return "particles", step
        for slot in (0, 1):
            try:
                if self._a["resume/step"][slot] == step:
                    return "resume/particles", slot
            except Exception:  # a damaged stamp: that slot is untrusted
                pass
        return None

    def _slot_of(self, step: int) -> int | None:
        src = self._source(step) if step >= 0 else None
        return src[1] if src and src[0] == "resume/particles" else None

    def check_step(self, step: int) -> tuple[str, str, int] | None:
        """None when what a resume from `step` needs is present and decodes, else (message, array, step)."""
        src = self._source(step)
        if src is None:
            return (f"run store {self.path}: array 'resume/particles' step {step}: no slot holds this step's "
                    "ensemble", "resume/particles", step)
        for name, index in (src, ("mean", step), ("std", step)):
            arr = self._a[name]
            where = f"run store {self.path}: array '{name}' step {step}"
            for rest in itertools.product(*(range(n) for n in arr.cdata_shape[1:])):
                key = L.chunk_key(arr, (index, *rest))
                if not L.chunk_exists(arr, (index, *rest)):  # a missing chunk would read as fill_value
                    return f"{where}: chunk '{key}' is missing", name, step
                try:
                    arr.blocks[(index, *rest)]
                except Exception as e:
                    return f"{where}: chunk '{key}' does not decode ({L.one_line(e)})", name, step
        return None

    def last_intact_step(self) -> int:
        """The newest committed step whose resume data are intact (-1 when none is)."""
        if self._intact is None:
            t = self.committed_step
            candidates = [s for s in range(t, -1, -1) if self._source(s) is not None]
            self._intact = next((s for s in candidates if self.check_step(s) is None), -1)
        return self._intact

    def resume_state(self) -> tuple[int, np.ndarray | None]:
        """(step, particles after it) for the last intact committed step, or (-1, None)."""
        s = self.last_intact_step()
        if s < 0:
            return -1, None
        name, index = self._source(s)
        return s, self._a[name][index]

    def config_diff(self, new_config: Mapping, ignore: Sequence[str] = ()) -> list[str]:
        """Dotted keys whose values differ between `new_config` and the stored config, apart from `ignore` (keys,
        or prefixes of keys). A key one side lacks and the other holds as null is no difference: a key added to
        the configuration later, with a null default (the behaviour before it), does not block a resume of a store
        written before it."""
        old, new = _flatten(self.config), _flatten(L.as_json(dict(new_config)))
        skip = tuple(ignore)

        def ignored(key):
            return any(key == i or key.startswith(i + ".") for i in skip)

        def differs(key):
            a, b = old.get(key, _MISSING), new.get(key, _MISSING)
            return a != b and not ({a is _MISSING, b is _MISSING} == {True, False} and None in (a, b))

        return sorted(k for k in old.keys() | new.keys() if not ignored(k) and differs(k))


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
