"""What a panel of a page is: one small module that says what it needs, how it loads and how it draws.

A page (:mod:`sonde.server.ui.run_page`) draws its frame, builds every registered panel in order,
loads them once the browser connected, and passes each live update on. A panel is a
:class:`Panel` subclass:

* ``title``: what the panel is called (its heading, when it has one);
* ``slot``: where it goes: ``"body"`` (the page's column, in registry order) or ``"header"`` (an
  action beside the run's name);
* ``wanted(choices)``: whether the run has recorded anything it draws (a panel that is not wanted
  is neither queried nor refreshed; it may still draw a placeholder, and it is asked again at every
  live update, so a metric that starts later brings its panel);
* ``build()``: draw its widgets (placeholders; no store query here, the page must appear at once);
* ``load()``: first load, after the browser connected;
* ``refresh()``: a live update (the run moved): query again and merge, keeping the user's zoom;
* ``choices_changed()``: the run recorded a new (phase, topic, metric): offer it in the selectors.

Panels talk to each other only through the :class:`RunContext` they share: its ``phase``, its
``pick_layer`` (a click on one chart shows that layer in the others) and the overview's first data.

Adding a panel to the run page is one new module in :mod:`sonde.server.ui.panels` and one line in
its ``RUN_PANELS``.

Example:
    >>> class Notes(Panel):                                          # doctest: +SKIP
    ...     title = "Notes"
    ...     def build(self) -> None:
    ...         ui.label(f"{self.page.name}: {len(self.page.layers)} layers")
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from nicegui import ui

from sonde.server.ui.data import Choices
from sonde.server.ui.live_chart import LiveChart
from sonde.server.ui.source import Source

__all__ = ["Panel", "RunContext", "offer", "selector"]


@dataclass
class RunContext:
    """What the panels of one run page share: the run, its layers, its choices, and the selection.

    Attributes:
        source: the page's store reader.
        name: the run's name.
        run: the run's row (:meth:`Source.run`).
        choices: what the run has recorded; replaced when that grows.
        layer_rows: the run's layers in forward order (:meth:`Source.layers`; empty on the graph page).
        labels: how each layer reads (``layer_label``), by layer name.
        phase: the phase the per-layer charts show (the overview's phase selector sets it).
        panels: the page's panels, in registry order.
        overview_ready: set once the overview heatmap's first query answered (data in ``overview``).
        overview: the first heatmap (``data``) and the (``topic``, ``metric``) it showed.
    """

    source: Source
    name: str
    run: dict[str, Any]
    choices: Choices
    layer_rows: list[dict[str, Any]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    phase: str = "train"
    panels: list[Panel] = field(default_factory=list)
    overview_ready: asyncio.Event = field(default_factory=asyncio.Event)
    overview: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        """The run's layer names, in forward order."""
        return [row["name"] for row in self.layer_rows]

    def redraw_all(self) -> None:
        """Redraw every panel (the phase changed)."""
        for panel in self.panels:
            panel.redraw()

    def pick_layer(self, layer: str) -> None:
        """Show ``layer`` in every panel that shows one layer or several (a click on the overview)."""
        for panel in self.panels:
            panel.layer_picked(layer)


class Panel:
    """One part of a page (see the module docstring); subclasses set ``title`` and override what they need.

    Args:
        page: what the page's panels share.
    """

    title: ClassVar[str] = ""
    slot: ClassVar[str] = "body"

    def __init__(self, page: RunContext) -> None:
        self.page = page
        #: The panel's self-loading charts: ``load`` redraws them, ``refresh`` merges into them.
        self.charts: list[LiveChart] = []

    def wanted(self, choices: Choices) -> bool:
        """Whether the run has recorded anything this panel draws (default: always, it says "nothing yet")."""
        return True

    def build(self) -> None:
        """Draw the panel's widgets inside the current NiceGUI container (placeholders; no query)."""
        raise NotImplementedError

    async def load(self) -> None:
        """The first load, once the browser connected."""
        await asyncio.gather(*(chart.redraw() for chart in self.charts))

    async def refresh(self) -> None:
        """A live update: query again and merge into what is drawn (a chart keeps its zoom)."""
        await asyncio.gather(*(chart.refresh() for chart in self.charts))

    def redraw(self) -> None:
        """Draw again from scratch, soon (a selection changed)."""
        for chart in self.charts:
            ui.timer(0, chart.redraw, once=True)

    def choices_changed(self) -> None:
        """The run recorded something new (``page.choices`` is replaced): offer it."""

    def layer_picked(self, layer: str) -> None:
        """The user picked ``layer`` elsewhere on the page (a heatmap row)."""


def offer(select: ui.select, options: Sequence[str], value: str) -> None:
    """New options for a selector, keeping its value when it is still offered."""
    select.set_options(list(options), value=value if value in options else None)


def selector(options: list[str] | dict[str, str], value: Any, label: str, **kw: Any) -> ui.select:
    """A dense outlined selector; a value not among the options leaves it empty (never invalid).

    Example:
        >>> topic = selector(["activations", "weights"], "activations", "topic")   # doctest: +SKIP
    """
    # A run that has recorded nothing yet offers nothing: the selector starts empty, never invalid.
    value = value if value in options else None
    return ui.select(options, value=value, label=label, **kw).props("dense outlined options-dense").classes("min-w-40")
