"""nvseg_ray: NV-Segment-CTMR (VISTA3D) model, labels, I/O and upstream-exact inference.

Imports without Ray; the Ray jobs (``jobs/``) and the Serve app (``serve_apps/``) build on it.
"""

__version__ = "0.1.0"
