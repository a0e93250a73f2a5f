"""sonde export: the HTML report is self-contained and holds the run's data; tables round-trip."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import sonde
from sonde.cli import main
from sonde.export import export_html, export_table


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    db = tmp_path_factory.mktemp("export") / "s.db"
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    with sonde.probe(model, store=db, run="mlp", optimizer=opt,
                     metrics=["std", "mean", "norm", "zero_frac", "update_ratio", "loss", "train_accuracy"]) as p:
        for _ in range(6):
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            p.log(loss=loss, labels=y, outputs=out)
    return db


def test_html_report_is_self_contained_and_holds_the_data(recorded: Path, tmp_path: Path) -> None:
    out = export_html(recorded, "mlp", tmp_path / "report.html")
    page = out.read_text()
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # every image is inline
    assert "sonde report: mlp" in page and page.count("<img") >= 4 and "<svg" in page
    data = json.loads(re.search(r"id='sonde-data'>(.*?)</script>", page, re.S).group(1))  # type: ignore[union-attr]
    assert data["heatmap"]["topic"] == "activations" and data["heatmap"]["metric"] == "std"
    # The heatmap's numbers are the recorded ones, computed here from sonde.load independently.
    df = sonde.load(recorded, "mlp", topics="activations", metrics="std")
    expected = df.pivot(index="layer", columns="step", values="value")
    assert data["heatmap"]["layers"] == ["0", "1", "2"]
    np.testing.assert_allclose(np.array(data["heatmap"]["values"], dtype=float),
                               expected.loc[["0", "1", "2"]].to_numpy())
    losses = sonde.load(recorded, "mlp", topics="loss")
    assert data["charts"]["Loss"]["train"][1] == pytest.approx(losses.value.tolist())
    assert "Update ratio" in page and "Dead units" in page


def test_csv_and_parquet_round_trip(recorded: Path, tmp_path: Path) -> None:
    reference = sonde.load(recorded, "mlp")
    export_table(recorded, "mlp", tmp_path / "r.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "r.parquet"), reference)
    export_table(recorded, "mlp", tmp_path / "r.csv")
    back = pd.read_csv(tmp_path / "r.csv", keep_default_na=False, dtype={"layer": str})
    pd.testing.assert_frame_equal(back, reference, check_dtype=False)
    with pytest.raises(sonde.ConfigError, match=r"\.csv or \.parquet"):
        export_table(recorded, "mlp", tmp_path / "r.xlsx")


def test_export_command(recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    html_path, pq = tmp_path / "r.html", tmp_path / "r.parquet"
    assert main(["export", "mlp", "--store", str(recorded), "--html", str(html_path), "--parquet", str(pq)]) == 0
    assert html_path.exists() and pq.exists() and "records)" in capsys.readouterr().out
    assert main(["export", "nope", "--store", str(recorded), "--csv", str(tmp_path / "x.csv")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["export", "mlp", "--store", str(recorded), "--html", str(html_path), "--topic", "weights",
                 "--metric", "nosuch"]) == 2
    assert "no weights/nosuch records" in capsys.readouterr().err
