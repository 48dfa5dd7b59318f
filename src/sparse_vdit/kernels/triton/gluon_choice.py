"""Whether a dK/dV launch of the Triton backward goes to the warp-specialised Gluon kernel, and running it.

Gluon is Triton's experimental layer: where this Triton has no Gluon, or cannot compile the kernel, the
first launch says so once (a warning) and every launch runs the Triton dK/dV kernel instead.
"""

from __future__ import annotations

import warnings

FAILED: list[str] = []  # why the Gluon kernel could not be built here (said once; the Triton kernel runs)


def takes(q, table, kv_tile: int, q_step: int, stored: bool, any_token_major: bool, wanted) -> bool:
    """Whether this dK/dV launch goes to the Gluon sm90 kernel: ``wanted`` (the backward's ``gluon`` option: True,
    "all" or False) and :func:`.gluon_backward.applies`."""
    if not wanted or q.device.type != "cuda" or FAILED or (q.shape[-1] != 128 and wanted != "all"):
        return False
    try:
        from .gluon_backward import applies
    except ImportError as exc:
        return _failed(exc)
    return applies(q, table, kv_tile, q_step, stored, any_token_major, recompute=wanted == "all") is None


def run(*args, **kwargs) -> bool:
    """:func:`.gluon_backward.dkdv`; False (nothing launched) where this Triton cannot compile it."""
    from triton.compiler.errors import CompilationError

    from .gluon_backward import dkdv

    try:
        dkdv(*args, **kwargs)
    except CompilationError as exc:
        return _failed(exc)
    return True


def _failed(exc: Exception) -> bool:
    FAILED.append(f"{type(exc).__name__}: {str(exc)[:300]}")
    warnings.warn(f"sparse-vdit: the Gluon dK/dV kernel is not available with this Triton ({FAILED[0]}); "
                  "the Triton dK/dV kernel runs instead", RuntimeWarning, stacklevel=3)  # fmt: skip
    return False


__all__ = ["FAILED", "run", "takes"]
