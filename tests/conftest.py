from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import pytest
import torch

from collect import Collect

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter (sonde.keras tests)

# MXNet 1.9 needs numpy<1.24: tests/mxnet_env run in their own environment (make test-mxnet, part of make test)
collect_ignore = [] if importlib.util.find_spec("mxnet") else ["mxnet_env"]


@pytest.fixture
def collect() -> Collect:
    return Collect()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module", params=["kernel", "torch"])
def kernel_or_torch(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a module's tests twice: with sonde's compiled statistics kernel, and with the torch
    reductions it falls back to (on accelerators, or where no C compiler exists)."""
    from sonde.functional import native

    if request.param == "kernel":
        if not native.available():
            pytest.skip("the compiled kernel is not available here (no C compiler, or SONDE_NATIVE=0)")
        yield request.param
        return
    with native.disabled():
        yield request.param
