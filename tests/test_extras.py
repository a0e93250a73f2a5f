"""Optional parts fail with an error naming the extra that installs them, never an ImportError deep inside."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Each case runs in a fresh interpreter where the optional package cannot be imported (None in sys.modules).
_CASES = {
    "tensorboard": (["tensorboard"], "from sonde.sinks.tensorboard import TensorBoardSink\nTensorBoardSink()"),
    "postgres": (["psycopg"], "from sonde.store import open_store\nopen_store('postgresql://u@127.0.0.1:1/x')"),
    "video": (["imageio", "matplotlib"], "from sonde.sinks.video import VideoSink\nVideoSink()"),
    "export": (["pyarrow", "matplotlib"], """
import torch, sonde
m = torch.nn.Linear(2, 2)
with sonde.probe(m, run='r', store='s.db'):
    m(torch.randn(3, 2))
from sonde.export import export_table
export_table('s.db', 'r', 'out.parquet')
"""),
    "demo": (["sklearn"], "from sonde.demo import digits\ndigits()"),
}


@pytest.mark.parametrize("extra", sorted(_CASES))
def test_a_missing_optional_package_names_its_extra(extra: str, tmp_path: Path) -> None:
    blocked, code = _CASES[extra]
    prelude = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
    done = subprocess.run([sys.executable, "-c", prelude + code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("sonde.errors.ConfigError: ") and f"pip install 'sonde[{extra}]'" in last, done.stderr


def test_the_registry_of_sinks_loads_without_the_optional_packages(tmp_path: Path) -> None:
    code = ("import sys\nfor name in ('tensorboard', 'imageio', 'matplotlib', 'psycopg', 'pyarrow', 'sklearn'):\n"
            "    sys.modules[name] = None\nimport sonde.sinks\nprint(sorted(sonde.sinks.registry()))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "'tensorboard'" in done.stdout and "'store'" in done.stdout
