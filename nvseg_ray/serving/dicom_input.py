"""DICOM requests of the Serve app: a zip of one series uploaded to ``POST /v1/segment``, a DICOMweb series URL
given to ``POST /v1/vista3d/inference``, and the DICOM SEG answer (``"output": {"format": "dicom-seg"}``).

The DICOMweb URL passes the same checks as any image URL (:func:`nvseg_ray.serving.fetch.check_source`: scheme,
host allow-list, no private or loopback address) before a request is sent.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

from ..dicom.series import DicomSeries
from ..errors import DicomError, NvsegError
from ..redaction import redact_uri
from .fetch import FetchPolicy, check_source

T = TypeVar("T")

#: A zip upload starts with a local file header (or, for an empty archive, the end-of-central-directory record).
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def is_zip_upload(raw: bytes, name: str) -> bool:
    """Whether an upload is a zip archive (by its first bytes, whatever its file name says)."""
    return raw[:4] in ZIP_MAGIC or name.lower().endswith(".zip") and raw[:2] == b"PK"


def _single(series: list[DicomSeries], where: str) -> DicomSeries:
    if len(series) != 1:
        raise DicomError(f"{where} holds {len(series)} image series; a request segments exactly one",
                         hint="send one series per request (a series URL, or a zip of one series' instances); "
                         "use the batch job for whole studies", code="several_series", n_series=len(series))
    return series[0]


def with_uploaded_series(raw: bytes, name: str, work: Callable[[DicomSeries], T]) -> T:
    """Run ``work(series)`` on the one image series of an uploaded zip (kept in a private temporary folder that is
    removed afterwards, whatever happens).

    Raises:
        DicomError: not a zip, no image series, or several series in the archive.
    """
    from ..dicom.discovery import discover_series

    with tempfile.TemporaryDirectory(prefix="nvseg-upload-") as folder:
        path = os.path.join(folder, "upload.zip")
        with open(path, "wb") as handle:
            handle.write(raw)
        shown = f"upload:{name}"
        try:
            found = discover_series(path)
            return work(_single(found.series, f"the uploaded zip {name!r}"))
        except NvsegError as err:  # messages name the upload, never the temporary folder
            err.message = err.message.replace(path, shown).replace(folder, shown)
            for key, value in list(err.details.items()):
                if isinstance(value, str):
                    err.details[key] = value.replace(path, shown).replace(folder, shown)
            raise


def dicomweb_series(url: str, policy: FetchPolicy) -> DicomSeries:
    """The one image series a DICOMweb series URL names, after the URL passed the fetch policy.

    Raises:
        FetchRefused / FetchFailed: the URL is not allowed (scheme, host, private address).
        DicomError: the URL names no image series, or several (a study URL with several series).
        StorageError: the DICOMweb server refused or failed.
    """
    from ..dicom.dicomweb import discover, public_url

    plain = url[len("dicomweb+"):] if url.startswith("dicomweb+") else url
    check_source(plain, policy)
    series, _ = discover(url)
    if not series:
        raise DicomError(f"{redact_uri(public_url(url))} names no CT or MR image series", code="no_dicom_series")
    return _single(series, redact_uri(public_url(url)))


def seg_response_bytes(result: Any, cfg: Any, *, catalog: Any, model_identity: str,
                       model_sha256: str | None = None) -> bytes:
    """The DICOM SEG (Part 10 bytes) of a DICOM series' result (``cfg``: the request's InferenceConfig); its UIDs
    derive from the series' identity, the settings and the model, so the same request gives the same SEG object.

    Raises:
        ConfigError: the request's input was NIfTI (a SEG needs the source instances).
        DicomError: ``empty_segmentation`` when nothing was found (a SEG needs a segment).
    """
    from ..dicom.seg import build_seg, encode_seg
    from ..output import output_settings, package_versions, resume_key

    assembled = result.volume.dicom
    if assembled is None:
        cfg.model_copy(update={"output_format": "dicom-seg"}).output_formats(dicom=False)  # raises the explanation
    seed = resume_key(assembled.series.identity(), output_settings(cfg, result.prompts, dicom=True), model_identity)
    ds = build_seg(result.labels, assembled, catalog=catalog, seg_type=cfg.dicom.seg_type, seed=seed,
                   model_sha256=model_sha256, algorithm_version=package_versions().get("nvseg-ray", "unknown"))
    return encode_seg(ds)
