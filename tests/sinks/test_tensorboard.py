"""TensorBoardSink, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sonde.errors import StoreError
from sonde.records import Record
from sonde.sinks.base import RunInfo, SinkRunner
from sonde.sinks.tensorboard import TensorBoardSink, histogram_proto

RUN = "mlp"


def _accumulate(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={k: 0 for k in ("scalars", "histograms", "tensors",
                                                                       "images", "audio", "compressedHistograms")})
    acc.Reload()
    return acc


def _scalar(step: int, layer: str, topic: str, metric: str, value: float, phase: str = "train") -> Record:
    return Record(RUN, step, phase, layer, topic, metric, value)


def _array(step: int, metric: str, values: list[float], layer: str = "fc1", topic: str = "weights") -> Record:
    return Record(RUN, step, "train", layer, topic, metric, np.array(values, dtype=np.float64))


def test_scalars_round_trip_with_tags_and_steps(tmp_path: Path) -> None:
    sink = TensorBoardSink(logdir=tmp_path)
    sink.open(RunInfo(name=RUN))
    losses = [2.5, 1.25, 0.625]
    sink.write([_scalar(s, "", "loss", "loss", v) for s, v in enumerate(losses)])
    sink.write([
        _scalar(0, "fc1", "weights", "norm", 3.0),
        _scalar(5, "fc1", "weights", "norm", 4.0),
        _scalar(5, "", "outputs", "train_accuracy", 0.75),
        _scalar(5, "", "loss", "loss", 0.5, phase="eval"),
        _array(5, "eigenvalues", [1.0, 2.0]),  # an array that is no histogram: skipped
    ])
    sink.close()

    acc = _accumulate(tmp_path / RUN)
    assert sorted(acc.Tags()["scalars"]) == ["eval/loss", "fc1/weights/norm", "loss", "outputs/train_accuracy"]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == list(enumerate(losses))
    assert [(e.step, e.value) for e in acc.Scalars("fc1/weights/norm")] == [(0, 3.0), (5, 4.0)]
    assert [(e.step, e.value) for e in acc.Scalars("outputs/train_accuracy")] == [(5, 0.75)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [(5, 0.5)]
    assert acc.Tags()["histograms"] == []


def test_histograms_use_latest_edges(tmp_path: Path) -> None:
    sink = TensorBoardSink(logdir=tmp_path)
    sink.open(RunInfo(name=RUN))
    first_edges, later_edges = [-1.0, 0.0, 1.0, 2.0], [-4.0, -2.0, 2.0, 4.0]
    sink.write([_array(0, "histogram_edges", first_edges), _array(0, "histogram", [0.0, 3.0, 1.0])])
    sink.write([_array(1, "histogram", [2.0, 2.0, 0.0])])  # no new edges: the step-0 ones hold
    # Edges after the histogram of the same step, in the same batch, still apply to it.
    sink.write([_array(2, "histogram", [1.0, 0.0, 5.0]), _array(2, "histogram_edges", later_edges)])
    sink.close()

    acc = _accumulate(tmp_path / RUN)
    assert acc.Tags()["histograms"] == ["fc1/weights/histogram"]
    events = acc.Histograms("fc1/weights/histogram")
    assert [e.step for e in events] == [0, 1, 2]
    h0, h1, h2 = (e.histogram_value for e in events)

    assert list(h0.bucket_limit) == [0.0, 1.0, 2.0] and list(h0.bucket) == [0.0, 3.0, 1.0]
    assert list(h1.bucket_limit) == [0.0, 1.0, 2.0] and list(h1.bucket) == [2.0, 2.0, 0.0]
    assert list(h2.bucket_limit) == [-2.0, 2.0, 4.0] and list(h2.bucket) == [1.0, 0.0, 5.0]
    # min/max are the outer edges of the outermost non-empty bins; sums come from bin centres.
    assert (h0.min, h0.max, h0.num) == (0.0, 2.0, 4.0)
    assert h0.sum == pytest.approx(3 * 0.5 + 1 * 1.5)
    assert h0.sum_squares == pytest.approx(3 * 0.25 + 1 * 2.25)
    assert (h1.min, h1.max) == (-1.0, 1.0)
    assert (h2.min, h2.max, h2.num) == (-4.0, 4.0, 6.0)
    assert h2.sum == pytest.approx(1 * -3.0 + 5 * 3.0)


def test_histogram_waits_for_edges_from_a_later_batch(tmp_path: Path) -> None:
    sink = TensorBoardSink(logdir=tmp_path)
    sink.open(RunInfo(name=RUN))
    sink.write([_array(3, "histogram", [1.0, 1.0])])
    sink.write([_array(3, "histogram_edges", [0.0, 1.0, 2.0])])
    sink.close()

    events = _accumulate(tmp_path / RUN).Histograms("fc1/weights/histogram")
    assert [e.step for e in events] == [3]
    assert list(events[0].histogram_value.bucket) == [1.0, 1.0]


def test_mismatched_edges_skip_the_histogram_and_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sink = TensorBoardSink(logdir=tmp_path)
    sink.open(RunInfo(name=RUN))
    with caplog.at_level(logging.WARNING, logger="sonde"):
        sink.write([_array(0, "histogram_edges", [0.0, 1.0]), _array(0, "histogram", [1.0, 2.0, 3.0]),
                    _scalar(0, "", "loss", "loss", 1.0)])
    sink.close()
    acc = _accumulate(tmp_path / RUN)
    assert acc.Tags()["histograms"] == []
    assert [e.value for e in acc.Scalars("loss")] == [1.0]
    assert "3 bins" in caplog.text


def test_histogram_proto_matches_numpy_histogram() -> None:
    values = np.random.default_rng(0).normal(size=1000)
    counts, edges = np.histogram(values, bins=20)
    proto = histogram_proto(counts.astype(np.float64), edges)
    assert proto.num == 1000
    assert list(proto.bucket) == counts.tolist()
    assert np.allclose(list(proto.bucket_limit), edges[1:])
    assert proto.min == edges[0] and proto.max == edges[-1]
    # Centre-based estimates are within half a bin width of the true values.
    width = edges[1] - edges[0]
    assert abs(proto.sum - values.sum()) <= 1000 * width / 2


def test_flush_makes_events_readable_before_close(tmp_path: Path) -> None:
    sink = TensorBoardSink(logdir=tmp_path)
    sink.open(RunInfo(name=RUN))
    sink.write([_scalar(7, "", "loss", "loss", 0.25)])
    sink.flush()
    assert [(e.step, e.value) for e in _accumulate(tmp_path / RUN).Scalars("loss")] == [(7, 0.25)]
    sink.close()


def test_through_sink_runner(tmp_path: Path) -> None:
    sink = TensorBoardSink(logdir=tmp_path / "logs")
    sink.open(RunInfo(name=RUN))
    runner = SinkRunner(sink)
    for step in range(10):
        runner.submit([_scalar(step, "", "loss", "loss", 1.0 / (step + 1))])
    runner.close()
    assert runner.failed is None
    events = _accumulate(tmp_path / "logs" / RUN).Scalars("loss")
    assert [e.step for e in events] == list(range(10))
    assert [e.value for e in events] == pytest.approx([1.0 / (s + 1) for s in range(10)])


def test_unwritable_logdir_raises_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    sink = TensorBoardSink(logdir=blocker / "sub")
    with pytest.raises(StoreError, match="cannot write TensorBoard events to .*sub"):
        sink.open(RunInfo(name=RUN))
