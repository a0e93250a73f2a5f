"""``sonde export``: a run as one self-contained HTML report, or as a CSV/Parquet table.

The report is a single file with no external reference (charts are inline PNG data URIs, the
graph an inline SVG, the style inline), so it opens offline and can be mailed or attached to an
issue. It holds the run's overview heatmap (layers × steps of one metric), the key charts
(loss and accuracy; dead units, update ratios and gradient norms per layer, where recorded),
the model's graph coloured by the heatmap's metric at the last step, the layer × layer CKA
matrix at its last step (when ``cka_matrix`` was recorded), and the numbers behind
the heatmap, charts and matrix as JSON (``<script type="application/json" id="sonde-data">``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sonde.errors import ConfigError
from sonde.extras import require
from sonde.load import load
from sonde.store import Store, open_store

__all__ = ["add_parser", "cka_matrix_at_last_step", "export_html", "export_table", "heatmap_matrix", "run"]

#: (topic, metric) tried in order for the heatmap when none is asked for.
HEATMAP_DEFAULTS = (("activations", "std"), ("activations", "mean"), ("weights", "norm"), ("output_grads", "norm"))
#: Per-layer line charts in the report, when recorded: (title, topic, metric, log scale).
LAYER_CHARTS = (
    ("Dead units: fraction of exact zeros in activations", "activations", "zero_frac", False),
    ("Update ratio ‖Δw‖/‖w‖", "weight_updates", "update_ratio", True),
    ("Gradient norm at each layer's output", "output_grads", "norm", True),
)


def export_table(store: str | Path | Store, run: str, path: str | Path) -> pd.DataFrame:
    """Write ``sonde.load(store, run)`` to ``path`` (``.csv`` or ``.parquet``); returns that DataFrame.

    Example:
        >>> export_table("sonde.db", "mlp-digits", "mlp.parquet")   # doctest: +SKIP
    """
    target = Path(path)
    if target.suffix not in (".csv", ".parquet"):
        raise ConfigError(f"export_table writes .csv or .parquet files, got {str(path)!r}")
    df = load(store, run)
    if target.suffix == ".csv":
        df.to_csv(target, index=False)
    else:
        require("pyarrow", "export", "a Parquet export")
        df.to_parquet(target, index=False)
    return df


def heatmap_matrix(df: pd.DataFrame, topic: str, metric: str, layers: list[str], phase: str = "train",
                   max_steps: int = 400) -> tuple[list[str], list[int], np.ndarray]:
    """Layers × steps of one metric from a tidy DataFrame (``sonde.load``'s), steps thinned to ``max_steps``.

    Returns ``(layers, steps, values)`` with NaN where a layer has no value at a step; layers keep
    the order given (probe order) and are left out when they have no value at all.
    """
    sel = df[(df.topic == topic) & (df.metric == metric) & (df.phase == phase)]
    table = sel.pivot_table(index="layer", columns="step", values="value", aggfunc="last")
    order = [name for name in layers if name in table.index] + sorted(set(table.index) - set(layers))
    table = table.reindex(order)
    steps = list(table.columns)
    if len(steps) > max_steps:
        keep = np.unique(np.linspace(0, len(steps) - 1, max_steps).round().astype(int))
        table = table.iloc[:, keep]
    return list(table.index), [int(s) for s in table.columns], table.to_numpy(dtype=float)


def cka_matrix_at_last_step(df: pd.DataFrame, layers: list[str], phase: str = "train"
                            ) -> tuple[int, list[str], np.ndarray] | None:
    """The layer × layer ``cka_matrix`` at the last step it was recorded, from a tidy DataFrame.

    Returns ``(step, layers, values)``: both axes in the order given (probe order; layers not
    given come last, sorted), ``values[i, j]`` the CKA of ``layers[i]`` against ``layers[j]``,
    NaN where a pair is missing. None when the run has no ``cka_matrix:*`` records.

    Example:
        >>> df = pd.DataFrame({"step": [4, 4], "phase": "train", "layer": ["a", "a"], "topic": "activations",
        ...                    "metric": ["cka_matrix:a", "cka_matrix:b"], "value": [1.0, 0.5]})
        >>> cka_matrix_at_last_step(df, ["a", "b"])[2].tolist()
        [[1.0, 0.5], [nan, nan]]
    """
    prefix = "cka_matrix:"
    sel = df[(df.topic == "activations") & (df.phase == phase) & df.metric.str.startswith(prefix)]
    if sel.empty:
        return None
    step = int(sel.step.max())
    sel = sel[sel.step == step]
    others = [str(m)[len(prefix):] for m in sel.metric]
    names = set(map(str, sel.layer)) | set(others)
    order = [n for n in layers if n in names] + sorted(names - set(layers))
    index = {n: i for i, n in enumerate(order)}
    values = np.full((len(order), len(order)), np.nan)
    for a, b, v in zip(sel.layer, others, sel.value, strict=True):
        values[index[str(a)], index[b]] = float(v)
    return step, order, values


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg canvas (no screen), or the error naming the extra to install."""
    require("matplotlib", "export", "the HTML report").use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _matrix_png(names: list[str], values: np.ndarray, title: str) -> str:
    plt = _pyplot()

    side = min(2.0 + 0.32 * len(names), 14.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    every = max(1, math.ceil(len(names) / 60))
    ticks = range(0, len(names), every)
    ax.set_xticks(ticks, names[::every], rotation=90, fontsize=7 if every == 1 else 5)
    ax.set_yticks(ticks, names[::every], fontsize=7 if every == 1 else 5)
    if len(names) <= 12:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="black" if v > 0.6 else "white")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _png(fig)


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _heatmap_png(names: list[str], steps: list[int], values: np.ndarray, title: str) -> str:
    plt = _pyplot()

    finite = values[np.isfinite(values)]
    log = finite.size > 0 and finite.min() > 0 and finite.max() / finite.min() > 100
    shown = np.log10(values) if log else values
    fig, ax = plt.subplots(figsize=(10, min(1.2 + 0.22 * len(names), 24.0)))
    extent = (steps[0] - 0.5, steps[-1] + 0.5, len(names) - 0.5, -0.5) if steps else None
    image = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", interpolation="nearest", cmap="viridis",
                      extent=extent)
    every = max(1, math.ceil(len(names) / 100))  # at most ~100 readable labels (ResNet-152 has 500 layers)
    ax.set_yticks(range(0, len(names), every), names[::every], fontsize=7 if every == 1 else 5)
    ax.set_xlabel("step")
    ax.set_title(title + (" (log10)" if log else ""), fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.03)
    return _png(fig)


def _lines_png(series: Series, title: str, log: bool) -> str:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(10, 3.2))
    for label, (steps, values) in series.items():
        ax.plot(steps, values, label=label, linewidth=1.2)
    if log and all(v > 0 for _, vs in series.values() for v in vs if math.isfinite(v)):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    if 1 < len(series) <= 12:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _png(fig)


Series = dict[str, tuple[list[int], list[float]]]


def _series(df: pd.DataFrame, topic: str, metric: str, phase: str = "train") -> Series:
    sel = df[(df.topic == topic) & (df.metric == metric) & (df.phase == phase)].sort_values("step")
    return {str(layer or topic): (g.step.astype(int).tolist(), g.value.astype(float).tolist())
            for layer, g in sel.groupby("layer", sort=False)}


def _json_safe(values: Any) -> Any:
    if isinstance(values, float):
        return values if math.isfinite(values) else None
    if isinstance(values, (list, tuple)):
        return [_json_safe(v) for v in values]
    if isinstance(values, dict):
        return {k: _json_safe(v) for k, v in values.items()}
    return values


def export_html(store: str | Path | Store, run: str, path: str | Path, *, topic: str | None = None,
                metric: str | None = None, max_steps: int = 400) -> Path:
    """Write the run's self-contained HTML report to ``path``.

    Args:
        store: the store the run is in (path, URL or open Store).
        run: the run's name.
        path: the HTML file to write.
        topic, metric: what the overview heatmap and the graph's colours show (default: activations std,
            or the first recorded of activations mean, weights norm, output_grads norm).
        max_steps: thin the heatmap to at most this many steps.

    Example:
        >>> export_html("sonde.db", "mlp-digits", "report.html")   # doctest: +SKIP
    """
    opened = store if isinstance(store, Store) else open_store(store, create=False)
    try:
        df = load(opened, run)
        info = opened.run_info(run) or {"name": run}
        layer_order = list(opened.layers(run)["name"])
        graph = opened.get_graph(run)
    finally:
        if not isinstance(store, Store):
            opened.close()
    present = set(zip(df.topic, df.metric))
    if topic is None or metric is None:
        choices = [(t, m) for t, m in HEATMAP_DEFAULTS if (topic in (None, t)) and (metric in (None, m))]
        found = [c for c in choices if c in present]
        if not found:
            candidates = sorted(c for c in present if (topic in (None, c[0])) and (metric in (None, c[1])))
            found = candidates or sorted(present)
        if not found:
            raise ConfigError(f"run {run!r} has no scalar records to report on")
        topic, metric = found[0]
    elif (topic, metric) not in present:
        raise ConfigError(f"run {run!r} has no {topic}/{metric} records; it has "
                          f"{', '.join(sorted(f'{t}/{m}' for t, m in present))}")
    names, steps, values = heatmap_matrix(df, topic, metric, layer_order, max_steps=max_steps)
    data: dict[str, Any] = {"run": run, "heatmap": {"topic": topic, "metric": metric, "layers": names,
                                                    "steps": steps, "values": values.tolist()}, "charts": {}}
    sections = [f'<h2>Overview: {html.escape(topic)} / {html.escape(metric)}, layers × steps</h2>'
                f'<img alt="heatmap" src="{_heatmap_png(names, steps, values, f"{topic} {metric}")}">']
    for title, key, phases in (("Loss", ("loss", "loss"), ("train", "eval")),
                               ("Accuracy", ("outputs", "train_accuracy"), ("train", "eval"))):
        series = {f"{phase}": s for phase in phases for s in _series(df, *key, phase=phase).values()}
        if series:
            data["charts"][title] = series
            sections.append(f'<h2>{title}</h2><img alt="{title}" src="{_lines_png(series, title, False)}">')
    for title, t, m, log in LAYER_CHARTS:
        series = _series(df, t, m)
        if series:
            data["charts"][title] = series
            sections.append(f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" '
                            f'src="{_lines_png(series, title, log)}">')
    matrix = cka_matrix_at_last_step(df, layer_order)
    if matrix is not None:
        step, order, grid = matrix
        data["cka_matrix"] = {"step": step, "layers": order, "values": grid.tolist()}
        title = f"Layer similarity (linear CKA on the probe set) at step {step}"
        sections.append(f"<h2>{html.escape(title)}</h2><img alt='CKA matrix' "
                        f"src='{_matrix_png(order, grid, title)}'>")
    if graph is not None:
        from sonde.graph import Graph
        from sonde.graph.render import readable_view, to_svg

        last = {n: float(v[~np.isnan(v)][-1]) for n, v in zip(names, values) if np.isfinite(v).any()}
        svg = to_svg(readable_view(Graph.from_dict(graph)), last, standalone=False)
        sections.append(f"<h2>Graph ({html.escape(str(graph.get('model', '')))}), coloured by {html.escape(topic)} "
                        f"{html.escape(metric)} at the last step</h2><div class='graph'>{svg}</div>")
    when = info.get("started_at")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when)) if isinstance(when, (int, float)) else "?"
    meta = (f"model {html.escape(str(info.get('model', '?')))} · {info.get('steps', '?')} steps · "
            f"{len(layer_order)} layers · status {html.escape(str(info.get('status', '?')))} · started {started}")
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>sonde report: {html.escape(run)}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}"
        "h1{font-size:1.5em}h2{font-size:1.1em;margin-top:2em}img{max-width:100%}"
        ".graph{overflow-x:auto;border:1px solid #ddd;padding:4px}.meta{color:#666}"
        "</style></head><body>"
        f"<h1>sonde report: {html.escape(run)}</h1><p class='meta'>{meta}</p>"
        + "".join(sections)
        + "<script type='application/json' id='sonde-data'>"
        + json.dumps(_json_safe(data)).replace("</", "<\\/")
        + "</script></body></html>"
    )
    target = Path(path)
    target.write_text(page, encoding="utf-8")
    return target


def add_parser(commands: Any) -> Any:
    """Add the ``export`` subcommand to ``commands`` (an argparse subparsers object)."""
    parser = commands.add_parser("export", help="write a run as a self-contained HTML report, CSV or Parquet")
    parser.add_argument("run", help="run name")
    parser.add_argument("--store", default="sonde.db", help="SQLite path or postgresql://... URL (default: sonde.db)")
    parser.add_argument("--html", default=None, metavar="PATH", help="self-contained HTML report (opens offline)")
    parser.add_argument("--csv", default=None, metavar="PATH", help="the run's scalar records as a tidy CSV")
    parser.add_argument("--parquet", default=None, metavar="PATH", help="the same as a Parquet file")
    parser.add_argument("--topic", default=None, help="heatmap topic (default: activations)")
    parser.add_argument("--metric", default=None, help="heatmap metric (default: std)")
    return parser


def run(args: Any) -> int:
    """Execute ``sonde export`` with parsed arguments; returns the exit status."""
    import sys

    from sonde.errors import SondeError

    if not (args.html or args.csv or args.parquet):
        print("sonde export: give at least one of --html PATH, --csv PATH, --parquet PATH", file=sys.stderr)
        return 2
    try:
        for path in (args.csv, args.parquet):
            if path:
                df = export_table(args.store, args.run, path)
                print(f"wrote {path} ({len(df)} records)")
        if args.html:
            export_html(args.store, args.run, args.html, topic=args.topic, metric=args.metric)
            print(f"wrote {args.html}")
    except SondeError as exc:
        print(f"sonde export: {exc}", file=sys.stderr)
        return 2
    return 0
