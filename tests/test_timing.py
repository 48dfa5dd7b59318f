"""The timing helpers: clocks on the CPU, and the device name a result is recorded with."""

from __future__ import annotations

import time

import pytest
import torch

from sparse_vdit.timing import clock, device_name, seconds_between, seconds_per_step


def test_device_name_names_the_cpu_the_same_from_a_string_or_a_device():
    name = device_name("cpu")
    assert name.startswith("cpu (") and name.endswith(")") and len(name) > len("cpu ()")
    assert device_name(torch.device("cpu")) == name


@pytest.mark.gpu
def test_device_name_of_a_gpu_is_its_cuda_name():
    assert device_name("cuda") == device_name(torch.device("cuda", 0)) == torch.cuda.get_device_name(0)


def test_cpu_clocks_measure_the_time_between_them_and_sum_per_step():
    x = torch.randn(3)
    start = clock(x)
    time.sleep(0.01)
    end = clock(x)
    assert seconds_between(start, end) >= 0.0099  # the sleep's lower bound: perf_counter is monotonic
    totals = seconds_per_step([(0, 1.0, 1.5), (1, 2.0, 2.25), (0, 3.0, 3.5)])
    assert totals == {0: 1.0, 1: 0.25}
