"""Shared test set-up: hypothesis profiles and the device every device-aware test runs on.

`CI=true` selects a derandomized hypothesis profile (same examples every run); locally the examples
are random. No per-example deadline: the first call of an op may be slow on a loaded machine.
`MINIRLHF_TEST_DEVICE=cuda` runs the device-aware tests on CuPy (scripts/gpu_check.sh does).
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import minirlhf as mr
from minirlhf import backend

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI", "").lower() == "true" else "dev")

TEST_DEVICE = os.environ.get("MINIRLHF_TEST_DEVICE", "cpu")


@pytest.fixture
def device():
    """The device under test: "cpu" unless MINIRLHF_TEST_DEVICE says "cuda"."""
    if TEST_DEVICE == "cuda" and not backend.cupy_available():
        pytest.skip("MINIRLHF_TEST_DEVICE=cuda but no CuPy GPU is available")
    return TEST_DEVICE


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


requires_gpu = pytest.mark.skipif(not mr.cupy_available(), reason="needs CuPy and a CUDA GPU")
