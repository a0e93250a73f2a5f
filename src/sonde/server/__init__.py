"""The sonde server: REST API, store, roles (aggregator, evaluator, frontend) and the dashboard.

``sonde serve`` builds its app with :func:`sonde.server.app.create_app`; this package itself
imports nothing heavy, so that ``sonde.server.<module>`` can be imported on its own.

Example:
    >>> from sonde.server.app import create_app    # doctest: +SKIP
    >>> app = create_app("sonde.db")                # doctest: +SKIP
"""

from __future__ import annotations

__all__: list[str] = []
