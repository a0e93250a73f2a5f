"""Every docstring example in sonde runs and shows what it claims."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import sonde

#: Adapters whose framework lives in an environment of its own (MXNet needs numpy<1.24): their
#: docstrings run there, in tests/mxnet_env, with the rest of that adapter's tests.
ELSEWHERE = {"sonde.mxnet": "mxnet", "sonde.probe.mxnet": "mxnet", "sonde.probe.mxnet_module": "mxnet"}
MODULES = sorted(name for info in pkgutil.walk_packages(sonde.__path__, "sonde.")
                 if (name := info.name) not in ELSEWHERE or importlib.util.find_spec(ELSEWHERE[name]))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"
