"""Block-sparse attention kernels behind one function, :func:`sparse_attention`.

Each backend is one module (``reference``, ``flex``, ``fa4``, ``triton``) that declares what it
runs; :mod:`.registry` chooses one per table.
"""

from . import registry
from .api import resolve_backend, sparse_attention


def __getattr__(name: str):
    if name == "BACKENDS":  # "auto" and every backend found (registry.backends())
        return registry.backends()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "resolve_backend", "sparse_attention"]
