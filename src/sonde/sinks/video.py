"""The video sink: an MP4 (and a GIF) of chosen layers' tensors over training.

Tensors reach sinks as Records: the ``snapshot`` metric (:mod:`sonde.metrics.snapshot`) stages a
small downsampled copy of each chosen tensor on the training thread, and this sink renders one
frame per recorded step from those Records: a grid of panels, one per (layer, topic), 2-D tensors
as heatmaps, high-dimensional activations as a scatter of their 2-D PCA projection, everything
else as a histogram. Because snapshots are ordinary Records, the store can keep them and
``sonde record`` renders the same video from a finished run.

Frames are drawn with matplotlib's Agg canvas (no pyplot: thread-safe) on the sink's own
thread, never on the training thread, and appended to the files as they come (imageio with
imageio-ffmpeg for MP4, Pillow for GIF). The files are finalised by ``close`` — which the probe
calls on leaving its ``with`` block, also on Ctrl-C (KeyboardInterrupt) — and, as a last resort,
at interpreter exit, so an interrupted run still leaves complete, playable files.
"""

from __future__ import annotations

import atexit
import fnmatch
import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sonde.errors import ConfigError
from sonde.extras import require
from sonde.metrics.snapshot import HEATMAP, PROJECTION, decode_snapshot
from sonde.records import Record
from sonde.run_info import RunInfo
from sonde.sinks.base import Sink

__all__ = ["VideoSink", "add_parser", "record_from_store", "run"]

log = logging.getLogger("sonde")

Panel = tuple[str, str]  # (layer, topic)


class VideoSink(Sink):
    """Writes ``<dir>/<run>/tensors.mp4`` (and ``tensors.gif``) from ``snapshot`` Records.

    Use it with the ``snapshot`` metric on the layers to film::

        with sonde.probe(model, layers=["fc1", "fc2"], metrics=["snapshot"], every=5,
                         sinks=[VideoSink("runs")]) as p: ...

    Args:
        directory: where the run's folder with the files goes (default ``runs``).
        layers: names or globs of the layers to show (default: every layer that has snapshots).
        topics: topics to show (default: every topic that has snapshots).
        fps: frames (recorded steps) per second.
        formats: any of ``"mp4"``, ``"gif"``.
        max_panels: at most this many panels (the first ones in record order).
        panel_size: pixels of one panel, (width, height); multiples of 16 keep MP4 encoders happy.
        path: write to this file stem instead (``out/video`` gives ``out/video.mp4``, ``out/video.gif``).
        phase: film this phase's snapshots (``train``, or ``eval`` for the evaluation passes).

    Example:
        >>> sink = VideoSink("runs", layers=["fc*"], topics=["weights"], fps=8)   # doctest: +SKIP
    """

    name = "video"

    def __init__(self, directory: str | Path = "runs", *, layers: Sequence[str] | None = None,
                 topics: Sequence[str] | None = None, fps: float = 8.0, formats: Sequence[str] = ("mp4", "gif"),
                 max_panels: int = 12, panel_size: tuple[int, int] = (320, 256),
                 path: str | Path | None = None, phase: str = "train") -> None:
        unknown = sorted(set(formats) - {"mp4", "gif"})
        if unknown or not formats:
            raise ConfigError(f"VideoSink(formats=...) takes 'mp4' and/or 'gif', got {list(formats)!r}")
        if fps <= 0 or max_panels < 1 or min(panel_size) < 64:
            raise ConfigError(f"VideoSink expects fps > 0, max_panels >= 1 and panels >= 64 px; got fps={fps}, "
                              f"max_panels={max_panels}, panel_size={panel_size}")
        for module in ("imageio", "imageio_ffmpeg", "matplotlib"):
            require(module, "video", "VideoSink")
        self.directory = Path(directory)
        self.path = Path(path) if path is not None else None
        self.layers = [layers] if isinstance(layers, str) else list(layers) if layers is not None else None
        self.topics = [topics] if isinstance(topics, str) else list(topics) if topics is not None else None
        self.fps = fps
        self.phase = phase
        self.formats = tuple(formats)
        self.max_panels = max_panels
        self.panel_size = panel_size
        self.run = ""
        self.files: dict[str, Path] = {}
        self.frames = 0
        self.panels: list[Panel] = []
        self._pending: dict[int, dict[Panel, tuple[int, np.ndarray]]] = {}
        self._latest: dict[Panel, tuple[int, np.ndarray]] = {}
        self._limits: dict[Panel, list[float]] = {}
        self._writers: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._closed = False

    # -- Sink interface --------------------------------------------------------------------------
    def open(self, run: RunInfo) -> None:
        """Create the output folder (a bad path fails here, at ``probe()``)."""
        self.run = run.name
        stem = self.path if self.path is not None else self.directory / run.name / "tensors"
        try:
            stem.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"VideoSink cannot create {str(stem.parent)!r}: {exc}") from exc
        self.files = {fmt: stem.with_name(stem.name + "." + fmt) for fmt in self.formats}
        atexit.register(self._finalize)

    def write(self, records: Sequence[Record]) -> None:
        for record in records:
            if record.metric != "snapshot" or record.is_scalar or not self._wanted(record):
                continue
            panel = (record.layer, record.topic)
            if panel not in self.panels:
                if len(self.panels) >= self.max_panels:
                    continue
                self.panels.append(panel)
            kind, data = decode_snapshot(record.value)  # type: ignore[arg-type]
            self._pending.setdefault(record.step, {})[panel] = (kind, data)
        # A step is complete once a later step has arrived; render those, keep the newest pending.
        for step in sorted(self._pending)[:-1]:
            self._render(step, self._pending.pop(step))

    def close(self, status: str = "finished") -> None:
        """Render what is pending and finalise the files."""
        for step in sorted(self._pending):
            self._render(step, self._pending.pop(step))
        self._finalize()
        atexit.unregister(self._finalize)
        if self.frames:
            log.info("sonde: wrote %d frames to %s", self.frames, ", ".join(map(str, self.files.values())))

    # -- rendering ---------------------------------------------------------------------------------
    def _wanted(self, record: Record) -> bool:
        if record.phase != self.phase:
            return False
        if self.topics is not None and record.topic not in self.topics:
            return False
        return self.layers is None or any(fnmatch.fnmatchcase(record.layer, p) for p in self.layers)

    def _render(self, step: int, frame: dict[Panel, tuple[int, np.ndarray]]) -> None:
        self._latest.update(frame)
        image = self.draw(step)
        with self._lock:
            if self._closed:
                return
            if not self._writers:
                self._open_writers()
            for fmt, writer in self._writers.items():
                writer.append_data(image if fmt == "mp4" else image[::2, ::2])
            self.frames += 1

    def _open_writers(self) -> None:
        import imageio.v2 as imageio

        for fmt, path in self.files.items():
            if fmt == "mp4":
                self._writers[fmt] = imageio.get_writer(path, format="FFMPEG", fps=self.fps, codec="libx264",
                                                        macro_block_size=16, quality=7)
            else:
                self._writers[fmt] = imageio.get_writer(path, mode="I", duration=1000 / self.fps, loop=0)

    def _finalize(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fmt, writer in self._writers.items():
                try:
                    writer.close()
                except Exception as exc:  # noqa: BLE001 - finalise the other file regardless
                    log.error("sonde: could not finalise %s: %s", self.files[fmt], exc)
            self._writers.clear()

    def draw(self, step: int) -> np.ndarray:
        """The frame for ``step`` from the latest snapshot of every panel, as an RGB uint8 array."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        cols = min(3, len(self.panels))
        rows = math.ceil(len(self.panels) / cols)
        dpi = 64
        width, height = self.panel_size
        fig = Figure(figsize=(cols * width / dpi, rows * height / dpi), dpi=dpi)
        canvas = FigureCanvasAgg(fig)
        fig.suptitle(f"{self.run}  step {step}", fontsize=11)
        for i, panel in enumerate(self.panels):
            ax = fig.add_subplot(rows, cols, i + 1)
            ax.set_title(f"{panel[0]} {panel[1]}", fontsize=9)
            ax.tick_params(labelsize=7)
            if panel in self._latest:
                kind, data = self._latest[panel]
                self._draw_panel(ax, panel, kind, data)
        fig.subplots_adjust(left=0.08, right=0.97, bottom=0.08, top=0.86, hspace=0.45, wspace=0.3)
        canvas.draw()
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()

    def _grow(self, panel: Panel, lo: float, hi: float) -> tuple[float, float]:
        """Axis limits that only ever widen, so that frames are comparable over the video."""
        limits = self._limits.setdefault(panel, [lo, hi])
        limits[0], limits[1] = min(limits[0], lo), max(limits[1], hi)
        if limits[0] == limits[1]:
            return limits[0] - 0.5, limits[1] + 0.5
        return limits[0], limits[1]

    def _draw_panel(self, ax: Any, panel: Panel, kind: int, data: np.ndarray) -> None:
        finite = data[np.isfinite(data)]
        if finite.size == 0:
            ax.text(0.5, 0.5, "no finite values", ha="center", transform=ax.transAxes)
            return
        if kind == HEATMAP:
            bound = float(np.abs(finite).max())
            lo, hi = self._grow(panel, -bound if finite.min() < 0 else float(finite.min()), bound)
            ax.imshow(data, aspect="auto", interpolation="nearest", cmap="RdBu_r" if lo < 0 else "viridis",
                      vmin=lo, vmax=hi)
        elif kind == PROJECTION:
            bound = float(np.abs(finite).max())
            lo, hi = self._grow(panel, -bound, bound)
            ax.scatter(data[:, 0], data[:, 1], s=6, c=np.arange(len(data)), cmap="viridis")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_xlabel("PC 1", fontsize=7)
            ax.set_ylabel("PC 2", fontsize=7)
        else:
            lo, hi = self._grow(panel, float(finite.min()), float(finite.max()))
            ax.hist(finite, bins=40, range=(lo, hi), color="#3b528b")
            ax.set_xlim(lo, hi)


def record_from_store(store: Any, run: str, out: str | Path, *, layers: Sequence[str] | None = None,
                      topics: Sequence[str] | None = None, fps: float = 8.0,
                      formats: Sequence[str] = ("mp4", "gif"), phase: str = "train") -> VideoSink:
    """Render the video of a recorded run from the ``snapshot`` Records kept in its store.

    Args:
        store: path, URL or open Store.
        run: the run's name.
        out: file stem (``out/video`` writes ``out/video.mp4`` and ``out/video.gif``; a suffix is dropped).
        layers, topics, fps, formats: as :class:`VideoSink`.
        phase: which phase's snapshots (``train`` or ``eval``).

    Returns:
        the finished sink (``.files``, ``.frames``).

    Example:
        >>> record_from_store("sonde.db", "mlp", "mlp-video", layers=["fc*"])   # doctest: +SKIP
    """
    from sonde.load import load

    df = load(store, run, metrics="snapshot", phase=phase, arrays=True)
    if df.empty:
        raise ConfigError(f"run {run!r} has no snapshot records; record them with metrics=['snapshot'] "
                          "(sonde.metrics.Snapshot) on the layers to film")
    stem = Path(out)
    sink = VideoSink(path=stem.with_suffix("") if stem.suffix in (".mp4", ".gif") else stem, layers=layers,
                     topics=topics, fps=fps, formats=formats, phase=phase)
    sink.open(RunInfo(run))
    try:
        for _, group in df.groupby("step", sort=True):
            rows = group[["step", "phase", "layer", "topic", "metric", "value"]].to_dict("records")
            sink.write([Record(run, int(r["step"]), str(r["phase"]), str(r["layer"]), str(r["topic"]),
                               str(r["metric"]), np.asarray(r["value"], dtype=np.float64)) for r in rows])
    finally:
        sink.close()
    if not sink.frames:
        raise ConfigError(f"no snapshot of run {run!r} matches layers={layers!r} topics={topics!r}; it has "
                          f"{sorted(set(zip(df.layer, df.topic)))[:10]}")
    return sink


def add_parser(commands: Any) -> Any:
    """Add the ``record`` subcommand to ``commands`` (an argparse subparsers object)."""
    parser = commands.add_parser("record", help="render a tensor video (MP4/GIF) from a run's snapshot records")
    parser.add_argument("run", help="run name")
    parser.add_argument("--store", default="sonde.db", help="SQLite path or postgresql://... URL (default: sonde.db)")
    parser.add_argument("--out", default=None, help="file stem (default: runs/<run>/tensors)")
    parser.add_argument("--layers", nargs="+", default=None, help="layer names or globs (default: all filmed)")
    parser.add_argument("--topics", nargs="+", default=None, help="topics (default: all filmed)")
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--no-gif", action="store_true", help="write only the MP4")
    return parser


def run(args: Any) -> int:
    """Execute ``sonde record`` with parsed arguments; returns the exit status."""
    import sys

    from sonde.errors import SondeError

    out = args.out or str(Path("runs") / args.run / "tensors")
    formats = ("mp4",) if args.no_gif else ("mp4", "gif")
    try:
        sink = record_from_store(args.store, args.run, out, layers=args.layers, topics=args.topics, fps=args.fps,
                                 formats=formats)
    except SondeError as exc:
        print(f"sonde record: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {sink.frames} frames to " + ", ".join(str(p) for p in sink.files.values()))
    return 0
