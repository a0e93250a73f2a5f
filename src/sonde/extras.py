"""Optional parts of sonde and the package extra that installs each.

The core (``pip install sonde``) is what a probe writing to the local store and ``sonde serve``
need. Heavier parts are extras, and using one that is not installed raises a
:class:`~sonde.errors.ConfigError` naming the extra:

=================  ===========================================  ==============================
extra              installs                                     for
=================  ===========================================  ==============================
``tensorboard``    tensorboard                                  ``sinks=["tensorboard"]``
``postgres``       psycopg 3                                    a ``postgresql://`` store
``video``          imageio, imageio-ffmpeg, matplotlib          ``VideoSink``, ``sonde record``
``export``         matplotlib, pyarrow                          ``sonde export --html/--parquet``
``demo``           scikit-learn, tensorboard                    ``sonde demo``
=================  ===========================================  ==============================

Example:
    >>> require("json", "demo", "an example").dumps([1])
    '[1]'
    >>> require("no_such_module_sonde", "video", "VideoSink")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sonde.errors.ConfigError: VideoSink needs no_such_module_sonde, which is not installed: pip install 'sonde[video]'
"""

from __future__ import annotations

import importlib
from types import ModuleType

from sonde.errors import ConfigError

__all__ = ["missing", "require"]


def missing(module: str, extra: str, needed_for: str) -> ConfigError:
    """The error to raise when ``needed_for`` lacks ``module``, which the package extra ``extra`` installs."""
    return ConfigError(f"{needed_for} needs {module}, which is not installed: pip install 'sonde[{extra}]'")


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """``module``, imported; a :func:`missing` error when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing(module.split(".")[0], extra, needed_for) from exc
