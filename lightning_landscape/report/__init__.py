"""Reporting: scalars to every Lightning logger, media to W&B, files to the run directory."""

from lightning_landscape.report.reporter import Reporter

__all__ = ["Reporter"]
