"""A griffe extension for sonde's API reference: read ``Example:`` as an examples section.

sonde's docstrings are Google style and head their doctests ``Example:`` (Napoleon's spelling).
griffe's Google parser knows only ``Examples:`` as the examples section and reads any other
heading as an admonition of Markdown, where ``>>>`` lines become nested quotes. This extension
renames the heading while the docstrings load, so the examples render as code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename a docstring's ``Example:`` heading to ``Examples:`` (griffe's examples section)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
