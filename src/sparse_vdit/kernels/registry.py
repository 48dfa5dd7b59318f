"""Backends: what each one declares it runs, and the choice of one for a table and its inputs.

A backend is one module (or package) ``sparse_vdit.kernels.<name>`` with a ``BACKEND``
(:class:`Backend`: what it supports, where ``auto`` tries it), ``is_available(device) -> (ok, why)``
and ``run(q, k, v, table, softmax_scale)``: adding that file adds the backend (:func:`names` finds
it). A backend that can read a per-(sample, head) choice among candidate tables on the device
(SVG's decision, :func:`~sparse_vdit.kernels.select.select_attention`) also has
``run_selected(q, k, v, candidates, selected, softmax_scale)`` and ``SELECT_ON_DEVICE = True``.
Optional: ``run_with_lse`` (``run`` plus what the backward needs) and ``run_backward(grad_out,
q, k, v, out, lse, table, softmax_scale) -> (dq, dk, dv)``; without them the backward recomputes ``run``
under autograd. :func:`choose` picks one per (table, dtype, head dim, device) once and keeps the choice with
the table; ``auto`` says in the ``sparse_vdit`` log which backend it took and why the ones it
tries first were passed over.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger("sparse_vdit")

DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # on command lines
API_DTYPES = tuple(DTYPE_NAMES.values())  # what sparse_attention accepts at all


@dataclass(frozen=True)
class Backend:
    """What one backend runs. ``head_dims`` None: any the API takes (a multiple of 8 up to 256)."""

    name: str
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, ...] | None
    needs_cuda: bool  # False: also runs on the CPU (plain torch, or Triton's interpreter)
    token_major_in_place: bool  # reads token-major heads through the order itself (else permuted in memory)
    auto_rank: int = 100  # `auto` tries backends by ascending rank (the fastest first)
    backward: bool = False  # whether sparse_attention is differentiable on it (see api.sparse_attention)
    note: str = ""

    @property
    def module(self):
        return importlib.import_module(f"sparse_vdit.kernels.{self.name}")

    def input_problem(self, dtype: torch.dtype, head_dim: int) -> str | None:
        """Why inputs of ``dtype`` and ``head_dim`` cannot run here (None: they can)."""
        if self.head_dims is not None and head_dim not in self.head_dims:
            return f"backend {self.name!r} supports head dims {self.head_dims}, not {head_dim}"
        if dtype == torch.float64 and dtype not in self.dtypes:
            return f"backend {self.name!r} takes bf16, fp16 or fp32; float64 runs on the 'reference' backend"
        if dtype not in self.dtypes:
            names = " or ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"backend {self.name!r} needs {names} inputs, not {str(dtype).removeprefix('torch.')}"
        return None

    @property
    def selects_on_device(self) -> bool:
        """Whether the module's ``run_selected`` reads a per-(sample, head) choice of candidate
        tables on the device (its ``SELECT_ON_DEVICE``; without it the choice goes to the host)."""
        module = self.module
        return bool(getattr(module, "SELECT_ON_DEVICE", False)) and hasattr(module, "run_selected")

    def table_problem(self, block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> str | None:
        """Why a table of ``block_size`` cannot run here on ``device`` (None: it can)."""
        check = getattr(self.module, "supports", None)
        if check is None:
            return None
        ok, why = _table_support(self.name, block_size, head_dim, dtype, device)
        return None if ok else why


_NOT_BACKENDS = ("api", "registry", "dense", "checks", "select", "head_order")


@lru_cache(maxsize=None)
def names() -> tuple[str, ...]:
    """Every backend of ``sparse_vdit.kernels`` (each module with a ``BACKEND``), in the order ``auto`` tries them."""
    found = []
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name in _NOT_BACKENDS:
            continue
        try:
            module = importlib.import_module(f"{__package__}.{info.name}")
        except ImportError as err:  # a backend whose own imports fail is left out, and said so
            logger.warning("sparse_vdit: kernels.%s could not be imported (%s)", info.name, err)
            continue
        backend = getattr(module, "BACKEND", None)
        if isinstance(backend, Backend):
            found.append(backend)
    return tuple(b.name for b in sorted(found, key=lambda b: (b.auto_rank, b.name)))


def backends() -> tuple[str, ...]:
    """What ``sparse_attention(..., backend=)`` takes: ``"auto"`` and every backend's name."""
    return ("auto", *names())


@lru_cache(maxsize=None)
def get(name: str) -> Backend:
    """The declaration of backend ``name``."""
    if name not in names():
        raise ValueError(f"unknown backend {name!r}; choose one of {backends()}")
    return importlib.import_module(f"{__package__}.{name}").BACKEND


@lru_cache(maxsize=None)
def available(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether backend ``name`` can run on ``device`` here (installed, right GPU), and why (not)."""
    backend = get(name)
    if device.type != "cuda" and backend.needs_cuda:
        return False, f"{name} needs a CUDA GPU, tensors are on {device}"
    try:
        module = backend.module
    except ImportError as err:
        return False, f"sparse_vdit.kernels.{name} could not be imported ({err})"
    return module.is_available(device)


@lru_cache(maxsize=None)
def _table_support(name: str, block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device):
    return get(name).module.supports(block_size, head_dim, dtype, device)


@lru_cache(maxsize=None)
def _auto(device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int | None) -> tuple[str, str]:
    """The first usable backend of :func:`names` and why the ones before it were not."""
    if device.type != "cuda":
        return "reference", f"no fast backend on {device.type}"
    reasons = []
    for name in names():
        backend = get(name)
        why = backend.input_problem(dtype, head_dim)
        if why is None:
            ok, why = available(name, device)
            why = None if ok else why
        if why is None and block_size is not None:
            why = backend.table_problem(block_size, head_dim, dtype, device)
        if why is None:
            return name, "; ".join(reasons)
        reasons.append(f"{name}: {why}")
    raise AssertionError("the reference backend is always available")


_SAID: set = set()


def _device(q: torch.Tensor) -> torch.device:
    device = q.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve(backend: str, q: torch.Tensor, block_size: int | None = None) -> str:
    """The backend ``backend`` names for tensors like ``q`` (and tables of ``block_size``, if given).

    ``auto``: the first of :func:`names` that runs these inputs here, said once in the log.
    A named backend that cannot run them raises (ValueError: the inputs or the table; RuntimeError:
    not available here).
    """
    if backend != "auto" and backend not in names():
        raise ValueError(f"unknown backend {backend!r}; choose one of {backends()}")
    device, dtype, dim = _device(q), q.dtype, q.shape[-1]
    if backend == "auto":
        name, skipped = _auto(device, dtype, dim, block_size)
        key = (device, dtype, dim, block_size)
        if key not in _SAID and not torch.compiler.is_compiling():
            _SAID.add(key)
            block = "" if block_size is None else f" block={block_size}"
            logger.warning(
                "sparse_vdit: backend 'auto' uses %r for %s head_dim=%d%s on %s%s",
                name, str(dtype).removeprefix("torch."), dim, block, device, f" ({skipped})" if skipped else "",
            )  # fmt: skip
        return name
    chosen = get(backend)
    problem = chosen.input_problem(dtype, dim)
    if problem:
        raise ValueError(problem)
    ok, why = available(backend, device)
    if not ok:
        raise RuntimeError(f"backend {backend!r} is not available: {why}")
    if block_size is not None:
        problem = chosen.table_problem(block_size, dim, dtype, device)
        if problem:
            raise ValueError(problem)
    return backend


def choose(backend: str, q: torch.Tensor, table) -> Backend:
    """:func:`resolve` for ``table``, decided once per (table, backend asked for, dtype, head dim)."""
    name = table.form(("backend", backend, q.dtype, q.shape[-1]), lambda t: resolve(backend, q, t.block_size))
    return get(name)
