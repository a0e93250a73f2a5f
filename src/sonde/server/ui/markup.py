"""Store-derived text in the dashboard's markup: one escaping rule for HTML, SVG and tooltips.

Everything the store holds came from a client: run, layer, topic and metric names, layer types,
alert messages, graph nodes. Wherever the dashboard writes such a string into markup — HTML,
SVG, an attribute, or the JavaScript of an ECharts tooltip formatter (ECharts renders what a
formatter returns as HTML) — it goes through :func:`escape` first, or through
:func:`js_texts` when the formatter picks it out of an array at hover time. Text set through
NiceGUI elements (``ui.label``, table cells, select options) is text already and needs neither.

Example:
    >>> escape('<img src=x onerror="alert(1)">')
    '&lt;img src=x onerror=&quot;alert(1)&quot;&gt;'
    >>> js_texts(["fc1", "<b>"])
    '["fc1", "&lt;b&gt;"]'
    >>> css_token("module onmouseover=alert(1)")
    'module-onmouseover-alert-1-'
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable

__all__ = ["css_token", "escape", "js_texts"]

_NOT_CSS = re.compile(r"[^A-Za-z0-9_-]+")


def escape(text: object) -> str:
    """``text`` (any value, as ``str``) safe inside HTML or SVG text and quoted attribute values."""
    return html.escape(str(text), quote=True)


def js_texts(texts: Iterable[object]) -> str:
    """A JavaScript array literal of the escaped ``texts``, for a formatter that puts them into HTML.

    JSON is a JavaScript literal; ``<``, ``>`` and ``&`` are escaped too, so the array is also
    safe where the formatter's code itself ends up inside a page.
    """
    return json.dumps([escape(t) for t in texts])


def css_token(text: object) -> str:
    """``text`` reduced to the characters a CSS class name or id may hold (others become ``-``)."""
    return _NOT_CSS.sub("-", str(text))
