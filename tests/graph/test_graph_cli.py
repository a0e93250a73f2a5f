"""`sonde graph MODULE:FACTORY --input-shape ...` prints the tree and writes JSON and SVG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sonde.cli import main

NETS = '''
from torch import nn

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.GELU()

    def forward(self, x):
        return x + self.act(self.fc(x))

def build():
    return nn.Sequential(nn.Linear(4, 8), Block(), Block(), Block(), nn.Linear(8, 2))
'''


def test_graph_command_prints_tree_and_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nets = tmp_path / "nets.py"
    nets.write_text(NETS)
    out_json, out_svg = tmp_path / "g.json", tmp_path / "g.svg"
    assert main(["graph", f"{nets}:build", "--input-shape", "5,4", "--json", str(out_json),
                 "--svg", str(out_svg), "--fold"]) == 0
    text = capsys.readouterr().out
    assert "Sequential: " in text and "274 parameters" in text  # 4*8+8 + 3*(8*8+8) + 8*2+2
    assert "1 × 3" in text and "Block" in text and "[5, 2]" in text
    data = json.loads(out_json.read_text())
    names = [n["name"] for n in data["nodes"]]
    assert "2/add" in names and "3.act" in names and data["num_params"] == 274
    svg = out_svg.read_text()
    assert svg.startswith("<svg") and svg.count("<rect") >= 5


def test_graph_command_reports_bad_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "no_such_module_xyz:build", "--input-shape", "1,4"]) == 2
    assert "cannot import module 'no_such_module_xyz'" in capsys.readouterr().err
    nets = tmp_path / "nets.py"
    nets.write_text(NETS)
    assert main(["graph", f"{nets}:build", "--input-shape", "1,7"]) == 2
    err = capsys.readouterr().err
    assert "'linear' in module '0' failed" in err and "1x7 and 4x8" in err
