"""Block-sparse attention kernels behind one function, :func:`sparse_attention`."""

from .api import BACKENDS, resolve_backend, sparse_attention

__all__ = ["BACKENDS", "resolve_backend", "sparse_attention"]
