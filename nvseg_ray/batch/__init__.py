"""Batch segmentation on Ray tasks and actors (Ray is imported only when a run starts).

>>> from nvseg_ray.batch import BatchConfig, run_batch      # doctest: +SKIP
>>> result = run_batch(BatchConfig(input="s3://bkt/ct/", output="s3://bkt/masks/",
...                                inference={"checkpoint": "s3://bkt/model.pt", "modality": "CT_BODY"}))
>>> result.manifest[["uri", "status", "t_infer"]]           # doctest: +SKIP
"""

from .config import BatchConfig


def run_batch(cfg: BatchConfig, **kwargs):  # noqa: ANN201 - re-exported from .pipeline lazily
    """See :func:`nvseg_ray.batch.pipeline.run_batch`."""
    from .pipeline import run_batch as _run

    return _run(cfg, **kwargs)


__all__ = ["BatchConfig", "run_batch"]
