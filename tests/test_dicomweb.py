"""DICOMweb (nvseg_ray.dicom.dicomweb) against a real Orthanc with its DICOMweb plugin on loopback.

Orthanc is started by ``tests/orthanc.py`` (skipped, saying why, when it is not installed: ``scripts/bootstrap.sh``
installs it as root). One server without authentication holds the material of most tests; a second one with HTTP
basic authentication checks the credentials paths. Series are small generated CT stacks (8 slices of 32 x 32).
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="the dicom extra is needed: pip install 'nvseg-ray[dicom]'")
pytest.importorskip("dicomweb_client", reason="the dicom extra is needed: pip install 'nvseg-ray[dicom]'")

from nvseg_ray.dicom import dicomweb, synthetic  # noqa: E402
from nvseg_ray.dicom.dicomweb import (  # noqa: E402
    DicomwebRef,
    discover,
    is_dicomweb_url,
    parse_url,
    retrieve_series,
    series_exists,
    store,
)
from nvseg_ray.errors import ConfigError, DicomError, StorageError  # noqa: E402

from .orthanc import OrthancServer, orthanc_or_skip  # noqa: E402

USER, PASSWORD = "nvseg-reader", "pw-Zq81-never-shown"
CT_IMAGE = synthetic.CT_IMAGE_STORAGE
#: Seeds of the material here (UIDs derive from them; distinct from other test files sharing the server).
SEED = 1313


# --------------------------------------------------------------------------------------------------------
# Test material: nvseg_ray.dicom.synthetic series, uncompressed unless a test says otherwise (Orthanc 1.10
# cannot transcode on retrieval; this module asks for the original syntax anyway)
# --------------------------------------------------------------------------------------------------------


def ct_series(folder: Path, *, study_uid: str, n: int = 4, seed: int = SEED, **kwargs: Any) -> list:
    """A small CT series (32 x 32 x ``n``) written by synthetic.write_series, as pydicom datasets."""
    fx = synthetic.write_series(folder, shape=(32, 32, n), study_uid=study_uid, seed=seed, **kwargs)
    return fx.datasets()


@pytest.fixture(autouse=True)
def _no_dicomweb_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in (dicomweb.ENV_TOKEN, dicomweb.ENV_USERNAME, dicomweb.ENV_PASSWORD):
        monkeypatch.delenv(name, raising=False)
    dicomweb.forget_url_credentials()
    yield
    dicomweb.forget_url_credentials()


# ``orthanc`` (session, tests/conftest.py): the server without authentication.
@pytest.fixture(scope="module")
def orthanc_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A second Orthanc with HTTP basic authentication (user USER, password PASSWORD)."""
    with orthanc_or_skip(tmp_path_factory.mktemp("orthanc-auth"), users={USER: PASSWORD}) as server:
        yield server


@pytest.fixture(scope="module")
def study(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Study A (synthetic.write_folder_with_extras): axial CT, coronal CT and MR series, an SR and a localizer.
    Study B: one CT series of 4 slices, sent with STOW-RS. Returns the fixtures and UIDs."""
    tmp = tmp_path_factory.mktemp("dicomweb-material")
    a = synthetic.write_folder_with_extras(tmp / "a", seed=SEED)
    b = synthetic.write_series(tmp / "b", shape=(32, 32, 4), seed=SEED + 1, study_uid=synthetic.uid(SEED, "b"))
    orthanc.upload(a.paths)
    orthanc.stow(b.paths)  # STOW-RS works as an upload path too
    return {"a": a.study_uid, "b": b.study_uid, "fx_a": a, "fx_b": b,
            "series_a": {s.series_uid for s in a.series}, "axial_a": a.series[0], "series_b": b.series_uid}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------------------
# URLs (no server)
# --------------------------------------------------------------------------------------------------------


def test_is_dicomweb_url() -> None:
    assert is_dicomweb_url("https://pacs/dicom-web/studies/1.2.3")
    assert is_dicomweb_url("http://pacs:8042/dicom-web/studies/1.2.3/series/4.5")
    assert is_dicomweb_url("https://pacs/dicom-web/series?Modality=CT&StudyInstanceUID=1.2,1.3")
    assert is_dicomweb_url("https://pacs/dicom-web/studies?StudyDate=20240101")
    assert is_dicomweb_url("dicomweb+https://pacs/dicom-web")
    assert is_dicomweb_url("DICOMWEB+http://pacs")
    assert not is_dicomweb_url("https://bucket.example.org/scans/ct.nii.gz")
    assert not is_dicomweb_url("https://pacs/dicom-web")
    assert not is_dicomweb_url("s3://bucket/studies/1.2.3")
    assert not is_dicomweb_url("/data/studies/1.2.3")


def test_parse_url_forms() -> None:
    assert parse_url("https://pacs/dicom-web/studies/1.2.3") == DicomwebRef(root="https://pacs/dicom-web",
                                                                            study_uid="1.2.3")
    ref = parse_url("http://u:p@pacs:8042/a/b/studies/1.2/series/3.4/instances/5.6")
    assert (ref.root, ref.study_uid, ref.series_uid, ref.sop_uid) == ("http://pacs:8042/a/b", "1.2", "3.4", "5.6")
    assert "u:p" not in repr(ref) and "u:p" not in ref.url()
    ref = parse_url("https://pacs/dicom-web/series?Modality=CT&StudyInstanceUID=1.2,1.3")
    assert ref.query_level == "series" and ref.query == (("Modality", "CT"), ("StudyInstanceUID", "1.2,1.3"))
    assert ref.url() == "https://pacs/dicom-web/series?Modality=CT&StudyInstanceUID=1.2,1.3"
    ref = parse_url("https://pacs/dicom-web/studies/1.2/series?Modality=MR")
    assert (ref.study_uid, ref.query_level, ref.query) == ("1.2", "series", (("Modality", "MR"),))
    assert parse_url("https://pacs/studies?StudyDate=2024").query_level == "studies"
    assert parse_url("dicomweb+https://pacs/dicom-web/").is_root
    assert parse_url("dicomweb+https://pacs/dicom-web/").root == "https://pacs/dicom-web"
    for bad in ("ftp://pacs/studies/1.2", "https://pacs/studies/../etc", "https://pacs/studies/1.2/metadata",
                "https://pacs/series/1.2", "https://pacs/studies/1.2/series/3.4/instances",
                "https://pacs/studies/1.2?Modality=CT"):
        with pytest.raises(ConfigError) as info:
            parse_url(bad)
        assert info.value.code == "invalid_dicomweb_url"


def test_public_url_strips_credentials() -> None:
    assert dicomweb.public_url("dicomweb+https://me:pw@pacs/dicom-web") == "https://pacs/dicom-web"
    assert "tok123" not in dicomweb.public_url("https://pacs/dicom-web/studies?access_token=tok123")


# --------------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------------


def test_discover_study_skips_sr_and_localizer(orthanc: OrthancServer, study: dict) -> None:
    url = f"{orthanc.dicomweb_root}/studies/{study['a']}"
    series, skipped = discover(url)
    assert skipped == Counter({"no_image:SR": 1, "localizer": 1})
    assert {s.series_instance_uid for s in series} == study["series_a"]
    assert sorted(s.modality for s in series) == ["CT", "CT", "MR"]
    fx = study["axial_a"]
    (s,) = [s for s in series if s.series_instance_uid == fx.series_uid]
    assert s.source == url and s.study_instance_uid == study["a"] and s.split == ""
    assert (s.series_description, s.sop_class_uid, s.frame_of_reference_uid) == (
        "synthetic CT axial", CT_IMAGE, fx.frame_of_reference_uid)
    assert [i.sop_instance_uid for i in s.instances] == sorted(fx.sop_instance_uids)
    first = s.instances[0]
    assert first.uri == (f"{orthanc.dicomweb_root}/studies/{study['a']}/series/{fx.series_uid}"
                         f"/instances/{first.sop_instance_uid}")
    assert first.n_frames == 1 and is_dicomweb_url(first.uri)
    expected = fx.dicom_series(source=url)  # what file discovery builds (its description differs: ignored)
    assert replace(s, series_description="") == replace(expected, series_description="",
                                                         instances=tuple(replace(i, uri=j.uri) for i, j in
                                                                         zip(expected.instances, s.instances)))
    for value in synthetic.PATIENT.values():
        assert value not in repr(series)


def test_discover_series_url(orthanc: OrthancServer, study: dict) -> None:
    series, skipped = discover(f"{orthanc.dicomweb_root}/studies/{study['b']}/series/{study['series_b']}")
    assert not skipped
    assert [s.series_instance_uid for s in series] == [study["series_b"]]
    assert series[0].n_instances == 4


def test_discover_qido_queries(orthanc: OrthancServer, study: dict) -> None:
    root = orthanc.dicomweb_root
    series, skipped = discover(f"{root}/series?Modality=CT&StudyInstanceUID={study['a']},{study['b']}")
    # the localizer is CT too: found by the query, then dropped by its ImageType
    ct_a = {fx.series_uid for fx in study["fx_a"].series if fx.modality == "CT"}
    assert {s.series_instance_uid for s in series} == ct_a | {study["series_b"]}
    assert skipped == Counter({"localizer": 1})
    series, skipped = discover(f"{root}/studies?StudyInstanceUID={study['a']}")  # every series of the studies
    assert {s.series_instance_uid for s in series} == study["series_a"]
    assert skipped == Counter({"no_image:SR": 1, "localizer": 1})
    series, _ = discover(f"{root}/studies/{study['a']}/series?Modality=MR")
    assert [s.modality for s in series] == ["MR"]
    assert discover(f"{root}/series?Modality=PT&StudyInstanceUID={study['a']}") == ([], Counter())


def test_discover_falls_back_to_series_metadata(orthanc: OrthancServer, study: dict,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that ignores includefield (no Rows in the instance answers): the series metadata is read instead."""
    real_client = dicomweb._client
    asked = []

    def client_without_includefield(ref, auth):
        client = real_client(ref, auth)
        search = client.search_for_instances

        def bare_search(*args, **kwargs):
            asked.append("qido")
            return [{k: v for k, v in item.items() if k not in ("00280010", "00280011", "00080008")}
                    for item in search(*args, **kwargs)]

        client.search_for_instances = bare_search
        return client

    monkeypatch.setattr(dicomweb, "_client", client_without_includefield)
    series, skipped = discover(f"{orthanc.dicomweb_root}/studies/{study['a']}")
    assert asked and {s.series_instance_uid for s in series} == study["series_a"]
    assert skipped == Counter({"no_image:SR": 1, "localizer": 1})  # ImageType came from the metadata


def test_discover_names_nothing(orthanc: OrthancServer, study: dict) -> None:
    with pytest.raises(StorageError) as info:
        discover(f"{orthanc.dicomweb_root}/studies/1.2.3.999/series/4.5.6")
    assert info.value.details["reason"] == "not_found" and info.value.http_status == 404
    assert "1.2.3.999" in info.value.message
    with pytest.raises(ConfigError):
        discover(f"dicomweb+{orthanc.dicomweb_root}")


def test_discover_splits_stacks_and_retrieves_each(orthanc: OrthancServer, tmp_path: Path) -> None:
    """One SeriesInstanceUID holding an axial and a coronal stack: two rows; each retrieves only its own."""
    study_uid, series_uid = synthetic.uid(SEED, "split-study"), synthetic.uid(SEED, "split-series")
    axial = synthetic.write_series(tmp_path / "ax", shape=(32, 32, 4), study_uid=study_uid, series_uid=series_uid,
                                   seed=SEED + 2)
    coronal = synthetic.write_series(tmp_path / "cor", shape=(32, 32, 3), orientation="coronal",
                                     study_uid=study_uid, series_uid=series_uid, seed=SEED + 3)
    orthanc.upload(axial.paths + coronal.paths)
    series, _ = discover(f"{orthanc.dicomweb_root}/studies/{study_uid}")
    assert sorted((s.split, s.n_instances) for s in series) == [("1", 4), ("2", 3)]
    for s in series:
        datasets = retrieve_series(s)
        assert [d.SOPInstanceUID for d in datasets] == [i.sop_instance_uid for i in s.instances]


# --------------------------------------------------------------------------------------------------------
# Retrieval, storage
# --------------------------------------------------------------------------------------------------------


def test_retrieve_series_returns_pixel_data_in_instance_order(orthanc: OrthancServer, study: dict) -> None:
    fx = study["axial_a"]
    (s,) = discover(f"{orthanc.dicomweb_root}/studies/{study['a']}/series/{fx.series_uid}")[0]
    datasets = retrieve_series(s)
    assert [d.SOPInstanceUID for d in datasets] == [i.sop_instance_uid for i in s.instances]
    sent = {d.SOPInstanceUID: d for d in fx.datasets()}
    for ds in datasets:
        assert ds.file_meta.TransferSyntaxUID == fx.transfer_syntax
        assert ds.pixel_array.shape == (fx.shape[1], fx.shape[0])
        np.testing.assert_array_equal(ds.pixel_array, sent[ds.SOPInstanceUID].pixel_array)


def test_retrieve_keeps_the_original_transfer_syntax(orthanc: OrthancServer, tmp_path: Path) -> None:
    """JPEG 2000 comes back as stored (Orthanc 1.10 answers 500 when asked to transcode it) and decodes."""
    fx = synthetic.write_series(tmp_path, shape=(32, 32, 3), transfer_syntax="jpeg2000", seed=SEED + 4,
                                study_uid=synthetic.uid(SEED, "j2k"))
    orthanc.upload(fx.paths)
    (s,) = discover(f"{orthanc.dicomweb_root}/studies/{fx.study_uid}")[0]
    sent = {d.SOPInstanceUID: d for d in fx.datasets()}
    for ds in retrieve_series(s):
        assert ds.file_meta.TransferSyntaxUID == synthetic.TRANSFER_SYNTAXES["jpeg2000"]
        np.testing.assert_array_equal(ds.pixel_array, sent[ds.SOPInstanceUID].pixel_array)


def test_discovery_and_sources_route_dicomweb(orthanc: OrthancServer, study: dict) -> None:
    """The package's entry points (discovery.discover_series, sources.load_datasets) go through this module."""
    from nvseg_ray.dicom.discovery import discover_series
    from nvseg_ray.dicom.sources import load_datasets

    found = discover_series(f"{orthanc.dicomweb_root}/studies/{study['a']}")
    assert {s.series_instance_uid for s in found.series} == study["series_a"]
    assert found.skipped == Counter({"no_image:SR": 1, "localizer": 1})
    datasets = load_datasets(found.series[0])
    assert [d.SOPInstanceUID for d in datasets] == [i.sop_instance_uid for i in found.series[0].instances]
    assert all(d.pixel_array.ndim == 2 for d in datasets)


def test_retrieve_series_missing_instance(orthanc: OrthancServer, study: dict) -> None:
    (s,) = discover(f"{orthanc.dicomweb_root}/studies/{study['b']}/series/{study['series_b']}")[0]
    gone = replace(s.instances[0], sop_instance_uid="1.2.3.4.5.6.7")
    damaged = replace(s, instances=(gone, *s.instances[1:]))
    with pytest.raises(DicomError) as info:
        retrieve_series(damaged)
    assert info.value.code == "dicom_unreadable" and "no longer" in info.value.message


def test_store_and_series_exists(orthanc: OrthancServer, study: dict, tmp_path: Path) -> None:
    root = f"dicomweb+{orthanc.dicomweb_root}"
    derived = ct_series(tmp_path / "derived", study_uid=study["b"], n=2, seed=SEED + 5)
    new_series = derived[0].SeriesInstanceUID
    assert not series_exists(root, study["b"], new_series)
    store(root, derived)
    assert series_exists(root, study["b"], new_series)
    assert series_exists(orthanc.dicomweb_root, study["b"], new_series)  # a plain root works too
    assert not series_exists(root, study["b"], synthetic.uid(SEED, "never stored"))
    stored = discover(f"{orthanc.dicomweb_root}/studies/{study['b']}/series/{new_series}")[0]
    assert stored[0].n_instances == 2
    back = {d.SOPInstanceUID: d for d in retrieve_series(stored[0])}
    for ds in derived:
        np.testing.assert_array_equal(back[ds.SOPInstanceUID].pixel_array, ds.pixel_array)
    # a dataset without preamble or file meta (pydicom writes neither unless asked) is stored as a PS3.10 file,
    # which Orthanc's WADO-RS can serve back; the caller's dataset is left as it was
    one = ct_series(tmp_path / "bare", study_uid=study["b"], n=1, seed=SEED + 6)[0]
    one.preamble = None
    del one.file_meta
    store(root, [one])
    assert not hasattr(one, "file_meta") and one.preamble is None
    (single,) = discover(f"{orthanc.dicomweb_root}/studies/{study['b']}/series/{one.SeriesInstanceUID}")[0]
    assert retrieve_series(single)[0].SOPInstanceUID == one.SOPInstanceUID
    with pytest.raises(ConfigError):
        store(f"{orthanc.dicomweb_root}/studies/{study['a']}", derived)  # another study than the URL's


# --------------------------------------------------------------------------------------------------------
# Authentication and failures
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_study(orthanc_auth: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    fx = synthetic.write_series(tmp_path_factory.mktemp("auth-material"), shape=(32, 32, 3), seed=SEED + 7,
                                study_uid=synthetic.uid(SEED, "auth-study"))
    orthanc_auth.upload(fx.paths)
    return {"study": fx.study_uid, "series": fx.series_uid,
            "url": f"{orthanc_auth.dicomweb_root}/studies/{fx.study_uid}/series/{fx.series_uid}"}


def test_basic_auth_from_env(orthanc_auth: OrthancServer, auth_study: dict, monkeypatch: pytest.MonkeyPatch,
                             tmp_path: Path) -> None:
    monkeypatch.setenv(dicomweb.ENV_USERNAME, USER)
    monkeypatch.setenv(dicomweb.ENV_PASSWORD, PASSWORD)
    (s,) = discover(auth_study["url"])[0]
    assert len(retrieve_series(s)) == 3
    derived = ct_series(tmp_path, study_uid=auth_study["study"], n=1, seed=SEED + 8)
    store(f"dicomweb+{orthanc_auth.dicomweb_root}", derived)
    assert series_exists(orthanc_auth.dicomweb_root, auth_study["study"], derived[0].SeriesInstanceUID)


def _assert_no_secret(err: BaseException, *secrets: str) -> None:
    texts = [str(err), repr(err), repr(getattr(err, "to_dict", dict)())]
    for secret in secrets:
        assert all(secret not in text for text in texts), secret
    assert err.__cause__ is None and err.__suppress_context__  # nothing chained can carry a header or URL


def test_wrong_password_is_a_clear_permission_error(orthanc_auth: OrthancServer, auth_study: dict,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "wrong-Pw-93jd"
    monkeypatch.setenv(dicomweb.ENV_USERNAME, USER)
    monkeypatch.setenv(dicomweb.ENV_PASSWORD, wrong)
    with pytest.raises(StorageError) as info:
        discover(auth_study["url"])
    err = info.value
    assert err.details["reason"] == "permission_denied" and err.http_status == 403
    assert "HTTP 401" in err.message and orthanc_auth.dicomweb_root in err.message
    assert dicomweb.ENV_USERNAME in err.hint and dicomweb.ENV_TOKEN in err.hint
    _assert_no_secret(err, wrong, PASSWORD)
    # a bearer token takes precedence over basic auth, and is never shown either
    monkeypatch.setenv(dicomweb.ENV_TOKEN, "tok-secret-777")
    with pytest.raises(StorageError) as info:
        discover(auth_study["url"])
    assert "bearer" in info.value.hint
    _assert_no_secret(info.value, "tok-secret-777", wrong)


def test_no_credentials(orthanc_auth: OrthancServer, auth_study: dict) -> None:
    with pytest.raises(StorageError) as info:
        discover(auth_study["url"])
    assert info.value.details["reason"] == "permission_denied" and "no credentials" in info.value.hint


def test_credentials_in_url_work_and_are_redacted(orthanc_auth: OrthancServer, auth_study: dict,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    import base64
    import logging

    host = orthanc_auth.url.split("://", 1)[1]
    path = auth_study["url"].split(host, 1)[1]
    url = f"http://{USER}:{PASSWORD}@{host}{path}"
    with caplog.at_level(logging.DEBUG):  # dicomweb-client, urllib3 and ours, at their most talkative
        (s,), _ = discover(url)
        assert s.source == auth_study["url"]
        assert all(PASSWORD not in i.uri and USER not in i.uri for i in s.instances)
        assert PASSWORD not in repr(s)
        assert len(retrieve_series(s)) == 3  # remembered for this root, in this process
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert caplog.records and PASSWORD not in caplog.text and basic not in caplog.text
    bad = f"http://{USER}:not-{PASSWORD}@{host}{path}"
    with pytest.raises(StorageError) as info:
        discover(bad)
    assert info.value.details["reason"] == "permission_denied"
    _assert_no_secret(info.value, f"not-{PASSWORD}", PASSWORD)


def test_connection_refused_is_clear(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(dicomweb, "MAX_ATTEMPTS", 1)  # the retry after 2 s would only slow the test down
    url = f"http://127.0.0.1:{_free_port()}/dicom-web/studies/1.2.3"
    with pytest.raises(StorageError) as info:
        discover(url.replace("http://", "http://someone:pw-x1@"))
    err = info.value
    assert err.details["reason"] == "io_error" and err.http_status == 502
    assert "connection refused" in err.message and url.rsplit("/studies", 1)[0] in err.message
    assert "running" in err.hint
    _assert_no_secret(err, "pw-x1", "someone")
    with pytest.raises(StorageError) as info:
        store(f"dicomweb+http://127.0.0.1:{_free_port()}/dicom-web", ct_series(tmp_path, study_uid="1.2.3", n=1))
    assert "connection refused" in info.value.message


def test_env_credentials_reach_the_session(monkeypatch: pytest.MonkeyPatch) -> None:
    ref = parse_url("https://pacs.invalid/dicom-web/studies/1.2")
    monkeypatch.setenv(dicomweb.ENV_USERNAME, "u1")
    monkeypatch.setenv(dicomweb.ENV_PASSWORD, "p1")
    session = dicomweb._client(ref, dicomweb._env_auth())._session
    assert session.auth == ("u1", "p1") and "Authorization" not in session.headers
    monkeypatch.setenv(dicomweb.ENV_TOKEN, "t1")  # the token wins over basic auth
    session = dicomweb._client(ref, dicomweb._env_auth())._session
    assert session.headers["Authorization"] == "Bearer t1" and session.auth is None
    assert "t1" not in repr(dicomweb._env_auth()) and "p1" not in repr(dicomweb._Auth("basic", "", "u1", "p1"))


def test_every_request_has_a_timeout() -> None:
    client = dicomweb._client(parse_url("https://pacs.invalid/dicom-web/studies/1.2"), None)
    assert client._timeout == dicomweb.REQUEST_TIMEOUT == (dicomweb.CONNECT_TIMEOUT_S, dicomweb.READ_TIMEOUT_S)


def test_orthanc_missing_gives_a_skip_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from . import orthanc as helper

    monkeypatch.setattr(helper.shutil, "which", lambda name: None)
    monkeypatch.setattr(helper, "ORTHANC_BIN", "/nonexistent/Orthanc")
    reason = helper.orthanc_missing_reason()
    assert reason and "scripts/bootstrap.sh" in reason and "orthanc-dicomweb" in reason


def test_dicomweb_secrets_are_secret_env() -> None:
    from nvseg_ray.redaction import is_secret_env

    assert is_secret_env(dicomweb.ENV_TOKEN) and is_secret_env(dicomweb.ENV_PASSWORD)
