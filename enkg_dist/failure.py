"""The one rule of what a failed member is: a member fails when its simulator raised, timed out or was lost, or when
any of its outputs is not finite (NaN or inf).

Torch-free, so that the store applies the rule without loading torch (`enkg-dist inspect`); `evaluation` builds the
forward results, the evaluator and the sampler's intake on it. Works on torch tensors (duck-typed) and numpy arrays.
"""

from __future__ import annotations

import numpy as np

NON_FINITE = "non-finite forward output"  # the reason recorded for a member failed by the rule


def finite_rows(psi):
    """(B,) bool: whether every output of each row of psi (B, m) is finite; torch or numpy, as psi is."""
    if hasattr(psi, "isfinite"):  # a torch tensor, on whichever device it lives
        return psi.isfinite().all(dim=1)
    return np.isfinite(np.asarray(psi)).all(axis=1)


def judged(psi, ok, reasons):
    """The rule on (psi, ok, reasons): (ok, reasons) with rows whose outputs are not finite failed, and a failed row
    without a reason given NON_FINITE when its outputs are not finite. psi and ok: both torch or both numpy."""
    finite = finite_rows(psi)
    ok = ok & finite
    return ok, [r or (None if f else NON_FINITE) for r, f in zip(reasons, finite.tolist())]  # one device sync
