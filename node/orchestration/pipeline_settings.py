"""The pipeline's settings from the node's configuration: one place for the node's workers and
for ``musclenode process``, so that a study gives the same numbers whichever way it came in."""

from __future__ import annotations

from inference.card import KIND_VERTEBRAE
from inference.registry import DEFAULT_LEVEL_MODEL, load_model
from reports.pipeline import PipelineSettings

from ..config import Config

__all__ = ["pipeline_settings"]


def pipeline_settings(config: Config) -> PipelineSettings:
    """How fat is measured and what it is compared with, as configured.

    Raises
    ------
    reports.centiles.ModelFileError
        When ``reference.site`` names a file that is not a usable site reference.
    """
    site = None
    if config.site_reference is not None:
        from reports.reference import load_site_reference

        site = load_site_reference(config.site_reference, site=config.reference.site_name)
    level_model = load_model(DEFAULT_LEVEL_MODEL, config.model_dirs, kind=KIND_VERTEBRAE)
    return PipelineSettings(erode_fat=config.erode_fat, cluster_method=config.cluster_method,
                            assume_levels=config.assume_levels or None, site_reference=site,
                            max_oblique_degrees=config.rules.max_oblique_degrees, level_model=level_model)
