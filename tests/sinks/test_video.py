"""Tensor videos: files read back with imageio, frame count and size; interrupted runs; snapshots."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from torch import nn

import sonde
from sonde.cli import main
from sonde.metrics.base import Capture
from sonde.metrics.snapshot import HEATMAP, PROJECTION, VALUES, Snapshot, decode_snapshot
from sonde.sinks.video import VideoSink, record_from_store


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _train(model: nn.Module, steps: int, stop_after: int | None = None, **probe_kw: object) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    with sonde.probe(model, optimizer=opt, **probe_kw):  # type: ignore[arg-type]
        for step in range(steps):
            if stop_after is not None and step == stop_after:
                raise KeyboardInterrupt
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                model(x[:4])  # an evaluation pass: phase eval, not filmed by default


def _frames(path: Path) -> tuple[int, tuple[int, int]]:
    if path.suffix == ".gif":
        frames = iio.imread(path, index=None)
        return frames.shape[0], (frames.shape[2], frames.shape[1])
    reader = imageio.get_reader(path)
    try:
        return reader.count_frames(), tuple(reader.get_meta_data()["size"])  # type: ignore[return-value]
    finally:
        reader.close()


def test_snapshot_kinds_against_numpy() -> None:
    weight = torch.randn(100, 30)
    m = Snapshot(max_side=64)
    m.update(Capture(weight, topic="weights"))
    m.absorb_staged({id(t): t.numpy() for _, t in m.staged})
    kind, data = decode_snapshot(m.compute()["snapshot"])
    assert kind == HEATMAP and data.shape == (64, 30)
    # adaptive average pooling over rows: bin i covers rows floor(i*100/64) .. ceil((i+1)*100/64)
    w = weight.numpy().astype(np.float64)
    expected = np.stack([w[(i * 100) // 64: -((-(i + 1) * 100) // 64)].mean(axis=0) for i in range(64)])
    np.testing.assert_allclose(data, expected, rtol=1e-5, atol=1e-6)

    acts = torch.randn(20, 3, 4, 4)
    m = Snapshot()
    m.update(Capture(acts, topic="activations"))
    m.absorb_staged({id(t): t.numpy() for _, t in m.staged})
    kind, points = decode_snapshot(m.compute()["snapshot"])
    assert kind == PROJECTION and points.shape == (20, 2)
    from sklearn.decomposition import PCA

    reference = PCA(n_components=2).fit_transform(acts.reshape(20, -1).numpy().astype(np.float64))
    for k in range(2):  # principal components are defined up to sign
        assert min(np.abs(points[:, k] - reference[:, k]).max(), np.abs(points[:, k] + reference[:, k]).max()) < 1e-4

    bias = torch.randn(10_000)
    m = Snapshot(max_values=4096)
    m.update(Capture(bias, topic="biases"))
    m.absorb_staged({id(t): t.numpy() for _, t in m.staged})
    kind, values = decode_snapshot(m.compute()["snapshot"])
    assert kind == VALUES and values.shape == (3334, 1)
    np.testing.assert_array_equal(values[:, 0], bias.numpy()[::3])


def test_video_sink_writes_one_frame_per_recorded_step(tmp_path: Path) -> None:
    sink = VideoSink(tmp_path, layers=["conv", "fc"], topics=["weights", "activations"], fps=4)
    _train(ConvNet(), steps=5, store=None, run="film", metrics=["snapshot"], sinks=[sink])
    mp4, gif = tmp_path / "film" / "tensors.mp4", tmp_path / "film" / "tensors.gif"
    assert sink.frames == 5
    # four panels: conv/fc weights (histogram, heatmap) and activations (projection, heatmap): 3 × 2 grid
    assert set(sink.panels) == {("conv", "weights"), ("fc", "weights"), ("conv", "activations"),
                                ("fc", "activations")}
    assert _frames(mp4) == (5, (3 * 320, 2 * 256))
    kind, points = sink._latest[("conv", "activations")]
    assert kind == PROJECTION and points.shape == (16, 2)  # the training batch, not the 4-sample eval pass
    assert _frames(gif) == (5, (3 * 160, 2 * 128))
    image = iio.imread(gif, index=0)
    assert image.std() > 10  # a drawn frame, not a blank one


def test_interrupted_training_leaves_complete_files(tmp_path: Path) -> None:
    sink = VideoSink(tmp_path, layers=["fc"], topics=["weights"], formats=["mp4", "gif"])
    with pytest.raises(KeyboardInterrupt):
        _train(ConvNet(), steps=10, stop_after=3, store=None, run="cut", metrics=["snapshot"], sinks=[sink])
    assert _frames(tmp_path / "cut" / "tensors.mp4")[0] == 3
    assert _frames(tmp_path / "cut" / "tensors.gif") == (3, (160, 128))


def test_record_from_store_and_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "s.db"
    _train(ConvNet(), steps=4, store=db, run="stored", metrics=[Snapshot(every=2)], layers=["fc"])
    sink = record_from_store(db, "stored", tmp_path / "v.mp4", topics=["weights"], formats=["mp4"])
    assert sink.frames == 2 and _frames(tmp_path / "v.mp4") == (2, (320, 256))
    assert main(["record", "stored", "--store", str(db), "--out", str(tmp_path / "w"), "--no-gif"]) == 0
    assert "frames to" in capsys.readouterr().out and (tmp_path / "w.mp4").exists()
    assert main(["record", "stored", "--store", str(db), "--layers", "nope"]) == 2
    assert "no snapshot of run 'stored' matches" in capsys.readouterr().err


def test_bad_arguments_fail_early(tmp_path: Path) -> None:
    with pytest.raises(sonde.ConfigError, match="'mp4' and/or 'gif'"):
        VideoSink(tmp_path, formats=["avi"])
    assert "video" in sonde.sinks.registry() and "snapshot" in sonde.metrics.registry()
