"""HTTP serving support for NV-Segment-CTMR: request handling, safe image fetching and response encodings.

* :mod:`nvseg_ray.serving.fetch` -- fetch the image a request names (http(s) with SSRF protection, s3://, ...).
* :mod:`nvseg_ray.serving.encode` -- encode a finished mask as a NIM-style NRRD zip, a NIfTI or JSON.
* :mod:`nvseg_ray.serving.service` -- request validation and processing, independent of Ray Serve.
"""
