"""The kernels' exponentials on the FMA units (``kernels.triton.exp2``) against float64, under the interpreter."""

from __future__ import annotations

import pytest
import torch

from sparse_vdit.kernels import registry

torch.set_num_threads(1)
triton = pytest.importorskip("triton")
tl = triton.language
from sparse_vdit.kernels.triton.exp2 import exp2_fma, exp2_split  # noqa: E402


def _needs_interpreter() -> None:
    if not registry.available("triton", torch.device("cpu"))[0]:
        pytest.skip("the Triton interpreter is off (TRITON_INTERPRET=1)")


@triton.jit
def _apply(X, Y, ROWS: tl.constexpr, COLUMNS: tl.constexpr, SPLIT: tl.constexpr):
    offs = tl.arange(0, ROWS)[:, None] * COLUMNS + tl.arange(0, COLUMNS)[None, :]
    x = tl.load(X + offs)
    tl.store(Y + offs, exp2_split(x) if SPLIT else exp2_fma(x))


def _run(x: torch.Tensor, split: bool) -> torch.Tensor:
    y = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    _apply[(1,)](x, y, ROWS=x.shape[0], COLUMNS=x.shape[1], SPLIT=split)
    return y


@pytest.mark.parametrize("split", [False, True], ids=["fma", "split"])
def test_exp2_within_the_polynomials_error_down_to_its_floor(split):
    """2^x to 7.6e-5 relative on [-125, 0.5] (softmax arguments: x <= 0, a little over from rounding), random
    and at the rounding boundaries (half-integers, integers); below -125 and at -inf at most 2^-124, not NaN."""
    _needs_interpreter()
    g = torch.Generator().manual_seed(0)
    grid = torch.cat([-125 * torch.rand(32 * 32 - 64, generator=g), torch.arange(-31.5, 0.5, 1.0), -torch.arange(0, 32.0)])
    x = grid[torch.randperm(grid.numel(), generator=g)].view(32, 32).float()
    y = _run(x, split)
    exact = torch.exp2(x.double())
    assert ((y.double() - exact).abs() / exact).max() <= 7.6e-5
    low = torch.tensor([[float("-inf"), -125.4, -300.0, -126.0] * 4] * 16)
    tiny = _run(low.float(), split)
    assert not tiny.isnan().any() and (tiny >= 0).all() and (tiny <= 2.0**-124).all()
    if split:  # the even columns went through tl.math.exp2: 0 at -inf and -300
        assert (tiny[:, 0::2] == 0).all()
