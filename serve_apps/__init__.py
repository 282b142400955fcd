"""Ray Serve applications over :mod:`nvseg_ray` (``serve run serve_apps/config.yaml``)."""
