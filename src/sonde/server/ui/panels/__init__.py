"""The run page's panels, one module each, and the list that puts them on the page.

Each panel is a :class:`~sonde.server.ui.panel.Panel`: what it needs from the store
(``wanted``), how it draws (``build``) and how it loads and follows a live run (``load``,
``refresh``). The run page builds them in the order of :data:`RUN_PANELS`; a panel whose
``slot`` is ``"header"`` goes beside the run's name, the others down the page.

Adding a panel is one module here and one line in :data:`RUN_PANELS`.

Example:
    >>> [panel.title for panel in RUN_PANELS][:3]
    ['Graph', 'Recording', 'Alerts']
"""

from __future__ import annotations

from sonde.server.ui.panel import Panel
from sonde.server.ui.panels.alerts import Alerts
from sonde.server.ui.panels.distributions import Distributions
from sonde.server.ui.panels.graph_link import GraphLink
from sonde.server.ui.panels.layers import LayersOverTraining
from sonde.server.ui.panels.overview import NetworkOverview
from sonde.server.ui.panels.schedule import Schedule
from sonde.server.ui.panels.similarity import LayerSimilarity
from sonde.server.ui.panels.training import TrainingCurves

__all__ = ["RUN_PANELS"]

#: The run page's panels, in page order.
RUN_PANELS: list[type[Panel]] = [
    GraphLink,
    Schedule,
    Alerts,
    TrainingCurves,
    NetworkOverview,
    LayersOverTraining,
    Distributions,
    LayerSimilarity,
]
