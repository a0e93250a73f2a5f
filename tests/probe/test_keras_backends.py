"""``sonde.keras.SondeCallback`` on Keras 3's torch and jax backends: ``keras_backend_cases.py``
run by pytest in a child process per backend (Keras chooses its backend once, when imported; this
process keeps the TensorFlow one that test_keras_callback.py uses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("keras_backend_cases.py")


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_the_keras_callback_records_every_topic_on_the_backend(backend: str) -> None:
    pytest.importorskip("keras")
    pytest.importorskip(backend)
    env = {**os.environ, "KERAS_BACKEND": backend}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(CASES)],
                          cwd=CASES.parents[2], env=env, capture_output=True, text=True, timeout=900)
    report = done.stdout[-6000:] + done.stderr[-3000:]
    assert done.returncode == 0, report
    assert " passed" in done.stdout and "skipped" not in done.stdout, report


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_the_callback_on_a_backend_loads_no_framework_keras_does_not(backend: str) -> None:
    """Keras on torch or JAX needs no TensorFlow: sonde.keras adds no framework to those Keras
    itself loads (Keras loads JAX on every backend where it is installed, for its Orbax callback)."""
    pytest.importorskip("keras")
    pytest.importorskip(backend)
    code = ("import sys\nheavy = ('tensorflow', 'jax')\nimport keras\nbefore = {m for m in heavy if m in sys.modules}\n"
            f"import sonde.keras, sonde.probe.keras_{backend}\n"
            "print(sorted({m for m in heavy if m in sys.modules} - before))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "KERAS_BACKEND": backend},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = done.stdout.strip().splitlines()[-1]
    assert loaded == "[]", f"sonde.keras loaded {loaded} on top of what Keras on {backend} loads"
