"""Serve security (issue 11 items 2, 3, 4-serve, 14): prefix allow-lists, no overwrite, redaction, bearer auth.

Unit tests of the path matcher, the token check, exclusive writes and redacted records run without Ray; the end-to-end
tests talk real HTTP to one module-scoped Serve app configured with auth and input/output prefixes (the moto S3
stand-in holds inputs and outputs).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from nvseg_ray.errors import (
    AuthRequired,
    AuthUnavailable,
    ConfigError,
    LocationNotAllowed,
    NvsegError,
    OutputExists,
    StorageError,
)
from nvseg_ray.io import write_bytes_atomic
from nvseg_ray.serving.auth import TokenAuth, read_tokens
from nvseg_ray.serving.prefixes import check_location, check_output_uri, parse_prefix
from nvseg_ray.serving.service import ServeSettings, error_body

from .model_helpers import TEST_PATCH, body_phantom, save_volume, segment_once

REPO = Path(__file__).resolve().parents[1]
TOKEN = "t0k3n-" + "a" * 32
OTHER_TOKEN = "r0tated-" + "b" * 32
SECRET = "pa55w0rd-XYZ"
SIGNATURE = "deadbeefcafe1234"


# --------------------------------------------------------------------------------------------------------
# The prefix matcher (one function for inputs and outputs)
# --------------------------------------------------------------------------------------------------------

PREFIXES = ("s3://masks", "s3://team-*/out", "gs://scans/ct/")


@pytest.mark.parametrize("uri,expected", [
    ("s3://masks/a/b.nii.gz", "s3://masks/a/b.nii.gz"),
    ("s3://masks", "s3://masks"),
    ("s3://masks//a///b.nii.gz", "s3://masks/a/b.nii.gz"),       # double slashes collapse
    ("s3://masks/a/", "s3://masks/a"),                           # trailing slash dropped
    ("S3://Masks/a", "s3://masks/a"),                            # scheme and bucket are case-insensitive
    ("s3a://masks/a", "s3://masks/a"),                           # fsspec alias of s3
    ("s3://team-a/out/x.nii.gz", "s3://team-a/out/x.nii.gz"),    # bucket glob
    ("gs://scans/ct/1.nii.gz", "gs://scans/ct/1.nii.gz"),
    (" s3://masks/x ", "s3://masks/x"),
])
def test_prefix_admits(uri: str, expected: str) -> None:
    assert check_location(uri, PREFIXES, role="output_uri", setting="allowed_output_prefixes") == expected


@pytest.mark.parametrize("uri,reason", [
    ("s3://masks/../inputs/ct.nii.gz", "malformed"),      # parent segment
    ("s3://masks/a/./b", "malformed"),
    ("s3://masks/a/%2e%2e/b", "malformed"),               # percent-escaped ..
    ("s3://masks/a%2Fb", "malformed"),
    ("s3://masks-evil/x", "prefix"),                      # same leading characters, other bucket
    ("s3://team-a/outside/x", "prefix"),                  # "out" is a segment, not a string prefix
    ("s3://team-a/output/x", "prefix"),
    ("s3://masks/a::s3://other/b", "malformed"),          # fsspec chain
    ("simplecache::s3://masks/x", "malformed"),
    ("blockcache::s3://masks/x", "malformed"),
    ("file:///etc/passwd", "prefix"),
    ("/etc/passwd", "prefix"),
    ("gs://scans/ctx/1.nii.gz", "prefix"),
    ("gs://masks/a", "prefix"),                           # scheme must match too
    ("s3://masks\\..\\inputs\\x", "malformed"),           # windows-style separators
    ("s3://KEY:SECRET@masks/x", "malformed"),             # user-info
    ("s3://masks/x?versionId=1", "malformed"),
    ("s3://masks/x#frag", "malformed"),
    ("s3://masks/a\x00b", "malformed"),
    ("relative/x.nii.gz", "malformed"),
    ("s3:///masks/x", "malformed"),                       # no bucket
    ("", "malformed"),
])
def test_prefix_refuses(uri: str, reason: str) -> None:
    with pytest.raises(LocationNotAllowed) as info:
        check_location(uri, PREFIXES, role="output_uri", setting="allowed_output_prefixes", code="output_not_allowed")
    assert info.value.http_status == 403 and info.value.code == "output_not_allowed"
    assert info.value.details["reason"] == reason, info.value.message
    assert "SECRET" not in info.value.message and "SECRET" not in json.dumps(info.value.to_dict())


def test_local_prefix_resolves_symlinks(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "escape").symlink_to(outside)          # a directory link inside the prefix pointing out of it
    (allowed / "file.nii.gz").symlink_to(outside / "x.nii.gz")
    (tmp_path / "alias").symlink_to(allowed)          # a link to the prefix is fine: it resolves inside
    prefixes = (str(allowed),)
    assert check_location(str(allowed / "a" / "b.nii.gz"), prefixes, role="o", setting="s") == \
        str(allowed.resolve() / "a" / "b.nii.gz")
    assert check_location(str(tmp_path / "alias" / "c.nii.gz"), prefixes, role="o", setting="s") == \
        str(allowed.resolve() / "c.nii.gz")
    for uri in (allowed / "escape" / "x.nii.gz", allowed / "file.nii.gz", f"{allowed}/../outside/x.nii.gz",
                f"file://{allowed}/escape/x.nii.gz", f"{allowed}x/y.nii.gz"):
        with pytest.raises(LocationNotAllowed):
            check_location(str(uri), prefixes, role="o", setting="s")
    with pytest.raises(LocationNotAllowed):  # file:// with a host
        check_location(f"file://evil{allowed}/a", prefixes, role="o", setting="s")


@pytest.mark.parametrize("prefix", ["s3://", "s3://*", "s3://**/x", "/", "relative/dir", "s3://b/../c",
                                    "simplecache::s3://b"])
def test_prefixes_that_admit_everything_or_are_malformed_are_config_errors(prefix: str) -> None:
    with pytest.raises(ConfigError):
        parse_prefix(prefix)
    with pytest.raises(NvsegError):  # the serve config refuses them too (was the shipped default "s3://")
        ServeSettings.from_args({"checkpoint": "m.pt", "allowed_output_prefixes": [prefix]})


def test_output_uri_must_be_a_nii_gz_inside_a_prefix() -> None:
    assert check_output_uri("s3://masks/a/seg.nii.gz", PREFIXES) == "s3://masks/a/seg.nii.gz"
    for bad in ("s3://masks/a/seg.json", "s3://masks/a/.nii.gz", "s3://masks/a/seg.NII.GZ", "s3://masks/a/seg.nii"):
        with pytest.raises(LocationNotAllowed) as info:
            check_output_uri(bad, PREFIXES)
        assert info.value.code == "output_not_allowed"


def test_shipped_config_has_no_write_anywhere_default() -> None:
    settings = ServeSettings(checkpoint="m.pt")
    assert settings.allowed_output_prefixes == () and settings.allowed_input_prefixes == ()
    assert settings.allow_overwrite is False and settings.auth_tokens_file is None
    doc = yaml.safe_load((REPO / "serve_apps" / "config.yaml").read_text())
    shipped = ServeSettings.from_args(doc["applications"][0]["args"])
    for prefix in (*shipped.allowed_output_prefixes, *shipped.allowed_input_prefixes):
        assert parse_prefix(prefix).bucket or parse_prefix(prefix).parts  # named, never "anywhere"
    assert shipped.allow_overwrite is False


# --------------------------------------------------------------------------------------------------------
# No overwrite: exclusive writes (local and S3 conditional PUT)
# --------------------------------------------------------------------------------------------------------


def test_exclusive_write_local(tmp_path: Path) -> None:
    target = tmp_path / "m.nii.gz"
    write_bytes_atomic(b"first", str(target), overwrite=False)
    with pytest.raises(OutputExists) as info:
        write_bytes_atomic(b"second", str(target), overwrite=False)
    assert info.value.http_status == 409 and isinstance(info.value, StorageError)
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["m.nii.gz"]  # no temp file left behind
    dangling = tmp_path / "d.nii.gz"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputExists):  # a (dangling) symlink is never written through
        write_bytes_atomic(b"x", str(dangling), overwrite=False)
    assert not (tmp_path / "nowhere").exists()
    write_bytes_atomic(b"third", str(target))  # the default still replaces (batch jobs, CLI)
    assert target.read_bytes() == b"third"


def test_exclusive_write_s3(s3_env: dict[str, Any], s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/masks/m.nii.gz"
    write_bytes_atomic(b"first", uri, overwrite=False)
    with pytest.raises(OutputExists):
        write_bytes_atomic(b"second", uri, overwrite=False)  # If-None-Match: * -- atomic, no check-then-write race
    import s3fs

    assert s3fs.S3FileSystem(**s3_env).cat(f"{s3_bucket}/masks/m.nii.gz") == b"first"


# --------------------------------------------------------------------------------------------------------
# Redaction of records and error bodies
# --------------------------------------------------------------------------------------------------------


def test_job_records_and_error_bodies_are_redacted() -> None:
    from nvseg_ray.serving.jobs import JobTable

    table = JobTable(lease_s=60)
    url = f"https://user:{SECRET}@images.example.org/ct.nii.gz?X-Amz-Signature={SIGNATURE}&X-Amz-Date=1"
    table.put({"job_id": "j", "status": "failed", "image": url, "output_uri": "s3://masks/j.nii.gz",
               "error": {"code": "x", "message": f"cannot fetch {url}"}})
    shown = json.dumps(table.get("j"))
    assert SECRET not in shown and SIGNATURE not in shown and "user" not in shown
    assert "images.example.org/ct.nii.gz" in shown and "X-Amz-Date=1" in shown
    body = json.dumps(error_body(StorageError(f"Cannot read {url!r}", uri=url), 422))
    assert SECRET not in body and SIGNATURE not in body


def test_report_records_redacted_uris(tmp_path: Path, tiny_checkpoint: str) -> None:
    from nvseg_ray.config import InferenceConfig
    from nvseg_ray.output import write_result

    path = tmp_path / "ct.nii.gz"
    save_volume(path, body_phantom((24, 22, 12), seed=3), np.diag([2.0, 2.0, 3.0, 1.0]))
    cfg = InferenceConfig(checkpoint=tiny_checkpoint, patch_size=TEST_PATCH, device="cpu", classes=["liver"])
    result = segment_once(cfg, path)
    out = tmp_path / "out" / "seg.nii.gz"
    url = f"https://u:{SECRET}@h.example/ct.nii.gz?token={SIGNATURE}"
    write_result(result, input_uri=url, output_uri=str(out), cfg=cfg, model_uri=None, model_sha256=None,
                 overwrite=False)
    text = (tmp_path / "out" / "seg.json").read_text()
    assert SECRET not in text and SIGNATURE not in text and "h.example/ct.nii.gz" in text
    mask = out.read_bytes()
    (tmp_path / "out" / "seg.json").unlink()
    (tmp_path / "out" / "seg.json").write_text("{}")  # only the report exists: still refused, mask untouched
    out.unlink()
    with pytest.raises(OutputExists):
        write_result(result, input_uri=url, output_uri=str(out), cfg=cfg, model_uri=None, model_sha256=None,
                     overwrite=False)
    assert not out.exists() and (tmp_path / "out" / "seg.json").read_text() == "{}"
    assert mask


# --------------------------------------------------------------------------------------------------------
# Bearer tokens
# --------------------------------------------------------------------------------------------------------


def _bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_token_file_rules_and_rotation(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    for bad in ("", "# only a comment\n\n", "short\n", f"{TOKEN} with-space\n"):
        path.write_text(bad)
        with pytest.raises(ConfigError) as info:  # never "no tokens = open"
            read_tokens(path)
        assert "t0k3n" not in info.value.message
    with pytest.raises(ConfigError):
        TokenAuth(str(tmp_path / "missing"))
    path.write_text(f"# service tokens\n{TOKEN}\n\n{OTHER_TOKEN}\n")
    auth = TokenAuth(str(path))
    ok = {"authorization": f"Bearer {TOKEN}"}
    assert auth.check("/v1/vista3d/info", ok) is None
    assert auth.check("/v1/vista3d/info", {"authorization": f"bearer {OTHER_TOKEN}"}) is None
    assert auth.check("/v1/health/live", {}) is None and auth.check("/v1/health/ready", {}) is None
    for headers in ({}, {"authorization": TOKEN}, {"authorization": f"Basic {TOKEN}"},
                    {"authorization": f"Bearer {TOKEN[:-1]}"}, {"authorization": f"Bearer {TOKEN}x"},
                    {"authorization": "Bearer "}):
        err = auth.check("/openapi.json", headers)
        assert isinstance(err, AuthRequired) and err.http_status == 401 and err.hint, headers
    path.write_text(f"{OTHER_TOKEN}\n")  # rotation: the old token stops working without a restart
    _bump_mtime(path)
    assert isinstance(auth.check("/v1/jobs", ok), AuthRequired)
    assert auth.check("/v1/jobs", {"authorization": f"Bearer {OTHER_TOKEN}"}) is None
    path.write_text("")  # a broken rotation fails closed (503), it does not open the service
    _bump_mtime(path)
    assert isinstance(auth.check("/v1/jobs", {"authorization": f"Bearer {OTHER_TOKEN}"}), AuthUnavailable)
    path.unlink()
    assert isinstance(auth.check("/v1/jobs", {"authorization": f"Bearer {OTHER_TOKEN}"}), AuthUnavailable)


# --------------------------------------------------------------------------------------------------------
# End to end: real HTTP against one Serve app with auth and prefixes
# --------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def secured(tiny_checkpoint: str, tmp_path_factory: pytest.TempPathFactory, ray_cluster: dict[str, str]):
    """The Serve app with bearer auth, input prefix s3://sec-in/ct, output prefix s3://sec-out/masks; yields a dict."""
    import boto3
    from ray import serve

    from serve_apps.app import build_app

    root = tmp_path_factory.mktemp("secured")
    save_volume(root / "ct.nii.gz", body_phantom((32, 30, 14), seed=7), np.diag([2.0, 2.0, 3.0, 1.0]))
    tokens = root / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    s3 = boto3.client("s3", endpoint_url=ray_cluster["AWS_ENDPOINT_URL"])
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for bucket in ("sec-in", "sec-out", "sec-in-evil"):
        if bucket not in existing:
            s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(root / "ct.nii.gz"), "sec-in", "ct/a.nii.gz")
    s3.upload_file(str(root / "ct.nii.gz"), "sec-in", "ct/folder/inner.nii.gz")  # ct/folder is a "directory"
    s3.put_object(Bucket="sec-out", Key="masks/taken_seg.nii.gz", Body=b"another team's mask")
    s3.put_object(Bucket="sec-out", Key="masks/report-only_seg.json", Body=b"{}")

    files = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **k: _Quiet(*a, directory=str(root), **k))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"checkpoint": tiny_checkpoint, "patch_size": list(TEST_PATCH), "device": "cpu", "request_timeout_s": 60,
            "allowed_hosts": ["127.0.0.1"], "allow_private_networks": True,
            "allowed_input_prefixes": ["s3://sec-in/ct"], "allowed_output_prefixes": ["s3://sec-out/masks"],
            "auth_tokens_file": str(tokens)}
    serve.run(build_app(args), name="nvseg", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/health/ready", timeout=5).status_code == 200:  # exempt from auth
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        pytest.fail("the secured service did not become ready")
    try:
        yield {"url": url, "tokens": tokens, "s3": s3, "files": f"http://127.0.0.1:{files.server_address[1]}",
               "auth": {"Authorization": f"Bearer {TOKEN}"}}
    finally:
        serve.shutdown()
        files.shutdown()
        files.server_close()


def _error(resp: httpx.Response) -> dict:
    assert resp.headers["content-type"].startswith("application/json"), resp.text[:200]
    err = resp.json()["error"]
    assert err["code"] and err["message"] and err["hint"], err
    return err


def test_auth_over_http(secured: dict) -> None:
    url, auth = secured["url"], secured["auth"]
    assert httpx.get(f"{url}/v1/health/live").status_code == 200
    for route in ("/v1/vista3d/info", "/openapi.json", "/docs", "/v1/jobs/nope"):
        resp = httpx.get(f"{url}{route}")
        assert resp.status_code == 401, (route, resp.status_code)
        assert resp.headers["www-authenticate"].startswith("Bearer") and _error(resp)["code"] == "unauthorized"
    wrong = httpx.get(f"{url}/v1/vista3d/info", headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
    assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["www-authenticate"]
    # a POST without a token is answered before its (large) body is looked at
    resp = httpx.post(f"{url}/v1/segment", files={"file": ("x.nii.gz", b"\0" * 2_000_000)})
    assert resp.status_code == 401
    assert httpx.get(f"{url}/v1/vista3d/info", headers=auth, timeout=30).status_code == 200
    assert httpx.get(f"{url}/openapi.json", headers=auth).status_code == 200


def _submit(secured: dict, image: str, output_uri: str) -> httpx.Response:
    return httpx.post(f"{secured['url']}/v1/jobs", headers=secured["auth"], timeout=60,
                      json={"image": image, "output_uri": output_uri, "prompts": {"classes": ["liver"]}})


@pytest.mark.parametrize("output_uri", [
    "s3://sec-out/masks/../../sec-in/ct/a.nii.gz",       # overwrite another patient's input
    "s3://sec-out/masks/a/%2e%2e/%2e%2e/x.nii.gz",
    "s3://sec-out/masks-evil/x.nii.gz",
    "s3://sec-out/masksx.nii.gz",
    "s3://sec-in/ct/a.nii.gz",
    "simplecache::s3://sec-out/masks/x.nii.gz",
    "file:///tmp/x.nii.gz",
    "s3://sec-out/masks/x.json",                          # not a mask name
])
def test_output_uri_escapes_refused_over_http(secured: dict, output_uri: str) -> None:
    resp = _submit(secured, "s3://sec-in/ct/a.nii.gz", output_uri)
    assert resp.status_code == 403, resp.text[:300]
    assert _error(resp)["code"] == "output_not_allowed"


def test_existing_outputs_are_never_replaced(secured: dict) -> None:
    s3 = secured["s3"]
    for target in ("s3://sec-out/masks/taken_seg.nii.gz", "s3://sec-out/masks/report-only_seg.nii.gz"):
        resp = _submit(secured, "s3://sec-in/ct/a.nii.gz", target)
        assert resp.status_code == 409, resp.text[:300]
        assert _error(resp)["code"] == "output_exists"
    assert s3.get_object(Bucket="sec-out", Key="masks/taken_seg.nii.gz")["Body"].read() == b"another team's mask"


def test_input_prefixes_and_uniform_unreadable_answer(secured: dict) -> None:
    url, auth = secured["url"], secured["auth"]
    post = lambda image: httpx.post(f"{url}/v1/vista3d/inference", headers=auth, timeout=60,  # noqa: E731
                                    json={"image": image, "prompts": {"classes": [1]}})
    for image in ("s3://sec-in-evil/ct/a.nii.gz", "s3://sec-in/other/a.nii.gz", "s3://sec-in/ct/../other/a.nii.gz",
                  "s3://sec-out/masks/taken_seg.nii.gz", "/etc/passwd"):
        resp = post(image)
        assert resp.status_code == 403 and _error(resp)["code"] == "url_not_allowed", (image, resp.text[:300])
    missing, directory = post("s3://sec-in/ct/nope.nii.gz"), post("s3://sec-in/ct/folder")
    assert missing.status_code == directory.status_code == 422
    a, b = _error(missing), _error(directory)
    assert a["code"] == b["code"] and a.get("reason") == b.get("reason") == "unreadable"
    assert a["message"].replace("nope.nii.gz", "X") == b["message"].replace("folder", "X")


def test_job_status_and_report_are_redacted(secured: dict) -> None:
    files = secured["files"].replace("http://", f"http://user:{SECRET}@")
    image = f"{files}/ct.nii.gz?X-Amz-Signature={SIGNATURE}&X-Amz-Credential=AKIA/x"
    resp = _submit(secured, image, "s3://sec-out/masks//jobs/a_seg.nii.gz")
    assert resp.status_code == 202, resp.text[:300]
    job_id = resp.json()["job_id"]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        job = httpx.get(f"{secured['url']}/v1/jobs/{job_id}", headers=secured["auth"], timeout=30).json()
        if job["status"] in ("succeeded", "failed"):
            break
        time.sleep(1)
    assert job["status"] == "succeeded", job
    shown = json.dumps(job)
    assert SECRET not in shown and SIGNATURE not in shown and "AKIA" not in shown
    assert job["output_uri"] == "s3://sec-out/masks/jobs/a_seg.nii.gz"  # the canonical URI is what was written
    report = secured["s3"].get_object(Bucket="sec-out", Key="masks/jobs/a_seg.json")["Body"].read().decode()
    assert SECRET not in report and SIGNATURE not in report and "ct.nii.gz" in report
    again = _submit(secured, image, "s3://sec-out/masks/jobs/a_seg.nii.gz")  # second job, same output: refused
    assert again.status_code == 409 and SECRET not in again.text
