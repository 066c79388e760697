"""What an analysis logs, declared once: the dashboard's panels are built from these declarations.

Example::

    >>> Logged(scalars=("lambda_max", "lambda_max/*"), media=("eigenvalues",)).kind("lambda_max/first")
    'line'
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass


@dataclass(frozen=True)
class Logged:
    """What an analysis logs, as ``fnmatch`` patterns of its key names (the part after ``<prefix>-<analysis>/``).

    Args:
        scalars: numbers over training (line plots).
        media: images and plotly figures (media browsers).
        tables: ``wandb.Table`` values (table panels).
    """

    scalars: tuple[str, ...] = ()
    media: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()

    def kind(self, name: str) -> str | None:
        """``"line"``, ``"media"``, ``"table"`` or None: the panel of key name ``name``."""
        for kind, patterns in (("line", self.scalars), ("media", self.media), ("table", self.tables)):
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                return kind
        return None
