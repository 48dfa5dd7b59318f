"""Block-sparse attention kernels behind one function, :func:`sparse_attention`.

Each backend is one module (``reference``, ``flex``, ``fa4``, ``triton``) that declares what it
runs; :mod:`.registry` chooses one per table. :func:`select_attention` runs a per-(sample, head)
choice among candidate tables (SVG), read on the device where the backend can.
"""

from . import registry
from .api import resolve_backend, sparse_attention
from .select import select_attention


def __getattr__(name: str):
    if name == "BACKENDS":  # "auto" and every backend found (registry.backends())
        return registry.backends()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "resolve_backend", "select_attention", "sparse_attention"]
