"""PSNR and SSIM of videos in [-1, 1]."""

import math

import numpy as np
import pytest
import torch

from sparse_vdit.metrics import psnr, ssim


def test_psnr_matches_its_definition_and_is_inf_when_equal():
    ref = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    noisy = ref + 0.1 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    mse = ((noisy - ref) ** 2).reshape(2, -1).mean(1).double()
    assert psnr(noisy, ref) == pytest.approx([10 * math.log10(4 / m) for m in mse.tolist()])
    assert psnr(ref[0], ref[0]) == [math.inf]
    assert psnr(ref.numpy(), ref.numpy()) == [math.inf, math.inf]


def test_ssim_is_one_for_equal_videos_and_drops_with_noise():
    pytest.importorskip("skimage")
    ref = torch.rand(1, 2, 3, 16, 16) * 2 - 1
    assert ssim(ref, ref) == pytest.approx([1.0])
    small, big = (ssim(ref + s * torch.randn(ref.shape), ref)[0] for s in (0.05, 0.5))
    assert 1 > small > big


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="differ"):
        psnr(torch.zeros(2, 3, 8, 8), torch.zeros(3, 3, 8, 8))
    with pytest.raises(ValueError, match="expected a video"):
        psnr(np.zeros((8, 8)), np.zeros((8, 8)))
