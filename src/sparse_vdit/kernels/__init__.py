"""Block-sparse attention kernels behind one function, :func:`sparse_attention`.

Each backend is one module (``reference``, ``flex``, ``fa4``, ``triton``) that declares what it
runs; :mod:`.registry` chooses one per table.
"""

from .api import BACKENDS, resolve_backend, sparse_attention

__all__ = ["BACKENDS", "resolve_backend", "sparse_attention"]
