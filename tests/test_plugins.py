"""A third-party metric installed from a package is used by name, through the entry points."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

PLUGIN = Path(__file__).parent / "plugin_pkg"

SCRIPT = textwrap.dedent(
    """
    import torch, sonde
    from sonde.metrics import registry
    from sonde.sinks import Sink

    class Collect(Sink):
        def __init__(self):
            self.records = []
        def write(self, records):
            self.records.extend(records)

    assert "peak_abs" in registry(), sorted(registry())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    sink = Collect()
    with sonde.probe(model, store=None, metrics=["peak_abs", "mean"], topics=["weights"], sinks=[sink]):
        model(torch.randn(4, 3)).sum().backward()
    value = [r.value for r in sink.records if r.metric == "peak_abs"]
    expected = model[0].weight.detach().abs().max().item()
    assert value == [expected], (value, expected)
    print("plugin-ok", value[0])
    """
)


def test_a_plugin_package_metric_is_usable_by_name(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(PLUGIN)],
        check=True, capture_output=True, text=True,
    )
    assert (target / "sonde_plugin_example").is_dir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "plugin-ok" in result.stdout
