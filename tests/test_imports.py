"""A training process loads only what training needs: no web server, no other framework."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

_HEAVY = ("fastapi", "nicegui", "uvicorn", "starlette", "tensorflow", "keras", "jax", "mxnet")


def _loaded_after(code: str, cwd: Path) -> dict[str, bool]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {_HEAVY!r}}}))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded: dict[str, bool] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


def test_import_sonde_loads_no_server_and_no_other_framework(tmp_path: Path) -> None:
    assert not any(_loaded_after("import sonde", tmp_path).values())


@pytest.mark.parametrize("sinks", [["store"], ["store", "tensorboard", "csv", "console"]])
def test_a_pytorch_run_with_the_local_sinks_loads_no_server_and_no_other_framework(
    tmp_path: Path, sinks: list[str]
) -> None:
    pytest.importorskip("tensorflow")  # the check means something only where TensorFlow could be loaded
    code = f"""
import torch, sonde
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with sonde.probe(model, run="r", store="s.db", optimizer=opt, sinks={sinks!r}) as p:
    for _ in range(3):
        out = model(torch.randn(16, 4)); loss = out.pow(2).mean()
        loss.backward(); opt.step(); opt.zero_grad(); p.log(loss=loss)
"""
    loaded = _loaded_after(code, tmp_path)
    assert not any(loaded.values()), loaded
    if "tensorboard" in sinks:
        assert list(tmp_path.glob("runs/r/events.out.tfevents.*"))
