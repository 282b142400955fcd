"""Unit tests of the serving support modules: safe image fetching, response encodings and the HTTP client.

Everything runs against servers on 127.0.0.1 started here (a fake image host and a fake nvseg service) or
the moto S3 stand-in from ``conftest.py``. Refusals of private / metadata addresses are checked with
``socket.connect`` patched to fail the test, so no traffic ever leaves the machine.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from nvseg_ray.client import NvsegClient, error_from_response, format_points, parse_retry_after
from nvseg_ray.commands import client as client_cmd
from nvseg_ray.errors import (
    EXIT_VOLUMES_FAILED,
    FetchFailed,
    FetchRefused,
    FetchTimeout,
    InputError,
    NvsegError,
    PayloadTooLarge,
    ServiceError,
)
from nvseg_ray.io import decode_nifti, write_bytes_atomic
from nvseg_ray.serving import fetch as fetch_mod
from nvseg_ray.serving.encode import (
    MEDIA_TYPES,
    EncodeError,
    decode_nrrd,
    image_nrrd_zip,
    label_dtype,
    nifti_gz,
    nrrd_zip,
    read_nrrd_zip,
    response_filename,
)
from nvseg_ray.serving.fetch import (
    FetchPolicy,
    address_problem,
    fetch_image,
    host_allowed,
    redact_uri,
)

from .helpers import CT_AFFINE

PAYLOAD = bytes(range(256)) * 40  # 10240 bytes


# --------------------------------------------------------------------------------------------------------
# Local HTTP servers
# --------------------------------------------------------------------------------------------------------


class _QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/octet-stream", length: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(value).encode(), headers, content_type="application/json")


@contextmanager
def _serve(handler: type[BaseHTTPRequestHandler], **state: Any) -> Iterator[ThreadingHTTPServer]:
    """Run ``handler`` on 127.0.0.1:<free port>; ``server.state`` is a dict the handler can use."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    shared = {"release": threading.Event(), "done": threading.Event(), "requests": [], **state}
    server.state = shared  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.state["release"].set()  # type: ignore[attr-defined]
        server.shutdown()
        server.server_close()
        thread.join(5)


def _url(server: ThreadingHTTPServer, path: str = "/") -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}{path}"


class ImageHost(_QuietHandler):
    """A fake image host: every path is one behaviour."""

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        state = self.server.state  # type: ignore[attr-defined]
        state["requests"].append((self.path, self.headers.get("Host")))
        port = self.server.server_address[1]
        path = self.path.split("?", 1)[0]
        if path == "/ok":
            self._send(200, PAYLOAD)
        elif path == "/missing":
            self._send(404, b"no such image")
        elif path == "/error":
            self._send(500, b"boom")
        elif path == "/big":
            self._send(200, b"x" * 4096)
        elif path == "/stream":  # no Content-Length: 64 MiB until the client hangs up
            self._send(200, length=False)
            state["stream_completed"] = False
            try:
                chunk = b"\0" * 65536
                for _ in range(1024):
                    self.wfile.write(chunk)
                state["stream_completed"] = True
            except OSError:
                pass
            finally:
                state["done"].set()
        elif path == "/slow":
            state["release"].wait(10)
            self._send(200, PAYLOAD)
        elif path == "/drip":  # one byte per 50 ms: no single read times out, the whole fetch does
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            try:
                for _ in range(100):
                    if state["release"].wait(0.05):
                        break
                    self.wfile.write(b"x")
            except OSError:
                pass
        elif path == "/to-ok":
            self._send(302, headers={"Location": "/ok"})
        elif path == "/to-evil":
            self._send(302, headers={"Location": "http://evil.example.com/x"})
        elif path == "/to-localhost":
            self._send(302, headers={"Location": f"http://localhost:{port}/ok"})
        elif path == "/to-metadata":
            self._send(301, headers={"Location": "http://169.254.169.254/latest/meta-data"})
        elif path == "/to-file":
            self._send(307, headers={"Location": "file:///etc/passwd"})
        elif path == "/loop":
            self._send(302, headers={"Location": "/loop"})
        else:
            self._send(404)


@pytest.fixture(scope="module")
def image_host() -> Iterator[ThreadingHTTPServer]:
    with _serve(ImageHost) as server:
        yield server


@pytest.fixture
def no_connect(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Fail on any outgoing TCP connection attempt (and record it)."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise AssertionError(f"unexpected connection to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


LOCAL = FetchPolicy(allow_private_networks=True, timeout_s=5)


# --------------------------------------------------------------------------------------------------------
# Fetch policy (pure)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "patterns", "allowed"),
    [
        ("images.example.org", (), True),
        ("images.example.org", ("images.example.org",), True),
        ("IMAGES.Example.org.", ("images.example.org",), True),
        ("other.example.org", ("images.example.org",), False),
        ("a.example.org", ("*.example.org",), True),
        ("a.b.example.org", ("*.example.org",), True),
        ("example.org", ("*.example.org",), False),
        ("badexample.org", ("*.example.org",), False),
        ("example.org.evil.com", ("*.example.org",), False),
        ("10.1.2.3", ("10.1.2.3",), True),
        ("::1", ("[::1]",), True),
        ("anything", ("*",), True),
    ],
)
def test_host_allowed(host: str, patterns: tuple[str, ...], allowed: bool) -> None:
    assert host_allowed(host, patterns) is allowed


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not publicly routable"),
        ("::1", "loopback"),
        ("fe80::1%eth0", "link-local"),
        ("fd00::1", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_problem(address: str, problem: str | None) -> None:
    assert address_problem(address) == problem


def test_policy_normalises_and_validates() -> None:
    hosts: Any = "Images.Example.org."  # a single string is one host, not its characters
    policy = FetchPolicy(allowed_schemes=("HTTPS://", "S3"), allowed_hosts=hosts)
    assert policy.allowed_schemes == ("https", "s3")
    assert policy.allowed_hosts == ("images.example.org",)
    with pytest.raises(NvsegError):
        FetchPolicy(max_bytes=0)
    with pytest.raises(NvsegError):
        FetchPolicy(timeout_s=0)


def test_redact_uri_hides_credentials_and_query() -> None:
    """fetch.redact_uri is the shared nvseg_ray.redaction.redact_uri: user-info and signature values masked."""
    assert redact_uri("https://user:pw@host:8443/a/b.nii.gz?X-Amz-Signature=abc") == \
        "https://***@host:8443/a/b.nii.gz?X-Amz-Signature=***"
    assert redact_uri("s3://bucket/key.nii.gz") == "s3://bucket/key.nii.gz"


# --------------------------------------------------------------------------------------------------------
# Fetch: refusals before any connection
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "policy", "reason"),
    [
        ("http://127.0.0.1:9/x", FetchPolicy(), "private_address"),
        ("http://169.254.169.254/latest", FetchPolicy(), "private_address"),
        ("http://10.0.0.1/", FetchPolicy(), "private_address"),
        ("http://[::1]:8000/x", FetchPolicy(), "private_address"),
        ("http://[::ffff:169.254.169.254]/", FetchPolicy(), "private_address"),
        ("http://0.0.0.0:8265/api/jobs", FetchPolicy(), "private_address"),
        ("http://localhost:8000/v1", FetchPolicy(), "private_address"),
        ("ftp://example.org/scan.nii.gz", FetchPolicy(), "scheme"),
        ("file:///etc/passwd", FetchPolicy(), "scheme"),
        ("/etc/passwd", FetchPolicy(), "scheme"),
        ("gs://bucket/scan.nii.gz", FetchPolicy(), "scheme"),
        ("http://example.org/scan.nii.gz", FetchPolicy(allowed_schemes=("https",)), "scheme"),
        ("https://evil.example.com/x", FetchPolicy(allowed_hosts=("*.images.org", "data.org")), "host"),
        ("https://10.0.0.1/x", FetchPolicy(allowed_hosts=("data.org",)), "host"),
        ("http://10.0.0.1/x", FetchPolicy(allowed_hosts=("10.0.0.1",)), "private_address"),  # listed != private ok
    ],
)
def test_refused_without_connecting(uri: str, policy: FetchPolicy, reason: str, no_connect: list[Any]) -> None:
    with pytest.raises(FetchRefused) as info:
        fetch_image(uri, policy)
    err = info.value
    assert (err.code, err.http_status, err.details.get("reason")) == ("url_not_allowed", 403, reason)
    assert not no_connect
    if reason == "scheme":
        assert "Allowed schemes:" in (err.hint or "")


def test_private_host_name_refused(monkeypatch: pytest.MonkeyPatch, no_connect: list[Any]) -> None:
    """A public-looking name that resolves to a private address is refused (every address is checked)."""
    monkeypatch.setattr(fetch_mod, "_resolve", lambda host, port: ["93.184.216.34", "10.1.2.3"])
    with pytest.raises(FetchRefused, match="10.1.2.3"):
        fetch_image("https://images.example.org/ct.nii.gz", FetchPolicy())
    assert not no_connect


def test_dns_rebinding_caught_at_connect(monkeypatch: pytest.MonkeyPatch, no_connect: list[Any]) -> None:
    """The pre-check sees a public address, the connection-time resolution a private one: refused."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])
    monkeypatch.setattr(fetch_mod, "_resolve", lambda host, port: next(answers))
    with pytest.raises(FetchRefused, match="127.0.0.1"):
        fetch_image("http://rebind.example.org/ct.nii.gz", FetchPolicy())
    assert not no_connect


def test_bad_urls_are_client_errors(no_connect: list[Any]) -> None:
    for uri in ("", "http://", "http://host:notaport/x"):
        with pytest.raises(FetchFailed) as info:
            fetch_image(uri, FetchPolicy())
        assert info.value.http_status == 422


# --------------------------------------------------------------------------------------------------------
# Fetch: a real local server (allowed only with allow_private_networks)
# --------------------------------------------------------------------------------------------------------


def test_local_server_needs_allow_private(image_host: ThreadingHTTPServer) -> None:
    with pytest.raises(FetchRefused):
        fetch_image(_url(image_host, "/ok"), FetchPolicy())
    assert fetch_image(_url(image_host, "/ok"), LOCAL) == PAYLOAD


def test_connects_to_the_checked_address(image_host: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wildcard-allowed name is fetched from the address it was checked against; Host stays the name."""
    monkeypatch.setattr(fetch_mod, "_resolve", lambda host, port: ["127.0.0.1"])
    port = image_host.server_address[1]
    policy = FetchPolicy(allowed_hosts=("*.example.test",), allow_private_networks=True, timeout_s=5)
    image_host.state["requests"].clear()  # type: ignore[attr-defined]
    assert fetch_image(f"http://images.example.test:{port}/ok?sig=1", policy) == PAYLOAD
    assert image_host.state["requests"] == [("/ok?sig=1", f"images.example.test:{port}")]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("path", "status"), [("/missing", 422), ("/error", 502)])
def test_remote_errors(image_host: ThreadingHTTPServer, path: str, status: int) -> None:
    with pytest.raises(FetchFailed) as info:
        fetch_image(_url(image_host, path), LOCAL)
    err = info.value
    assert (err.code, err.http_status) == ("image_fetch_failed", status)
    assert str(err.details["remote_status"]) in err.message


def test_connection_refused_is_502() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchFailed) as info:
        fetch_image(f"http://127.0.0.1:{port}/x", LOCAL)
    assert info.value.http_status == 502


def test_oversize_by_content_length(image_host: ThreadingHTTPServer) -> None:
    with pytest.raises(PayloadTooLarge) as info:
        fetch_image(_url(image_host, "/big"), FetchPolicy(allow_private_networks=True, max_bytes=1000))
    assert (info.value.code, info.value.http_status, info.value.details["size"]) == ("payload_too_large", 413, 4096)
    assert fetch_image(_url(image_host, "/big"), FetchPolicy(allow_private_networks=True, max_bytes=4096))


def test_oversize_while_streaming_stops_reading(image_host: ThreadingHTTPServer) -> None:
    state = image_host.state  # type: ignore[attr-defined]
    state["done"].clear()
    start = time.monotonic()
    with pytest.raises(PayloadTooLarge):
        fetch_image(_url(image_host, "/stream"), FetchPolicy(allow_private_networks=True, max_bytes=100_000))
    assert time.monotonic() - start < 5
    assert state["done"].wait(10)
    assert state["stream_completed"] is False  # the client hung up long before the 64 MiB were sent


def test_slow_server_times_out(image_host: ThreadingHTTPServer) -> None:
    start = time.monotonic()
    with pytest.raises(FetchTimeout) as info:
        fetch_image(_url(image_host, "/slow"), FetchPolicy(allow_private_networks=True, timeout_s=0.3))
    assert (info.value.code, info.value.http_status) == ("image_fetch_timeout", 504)
    assert time.monotonic() - start < 3


def test_overall_deadline(image_host: ThreadingHTTPServer) -> None:
    start = time.monotonic()
    with pytest.raises(FetchTimeout):
        fetch_image(_url(image_host, "/drip"), FetchPolicy(allow_private_networks=True, timeout_s=0.5))
    assert time.monotonic() - start < 3


def test_redirects(image_host: ThreadingHTTPServer) -> None:
    assert fetch_image(_url(image_host, "/to-ok"), LOCAL) == PAYLOAD
    only_ip = FetchPolicy(allowed_hosts=("127.0.0.1",), allow_private_networks=True, timeout_s=5)
    assert fetch_image(_url(image_host, "/to-ok"), only_ip) == PAYLOAD
    with pytest.raises(FetchRefused) as info:  # disallowed host: refused before resolving it
        fetch_image(_url(image_host, "/to-evil"), only_ip)
    assert info.value.details["reason"] == "host"
    with pytest.raises(FetchRefused):
        fetch_image(_url(image_host, "/to-localhost"), only_ip)
    with pytest.raises(FetchRefused) as info:
        fetch_image(_url(image_host, "/to-file"), LOCAL)
    assert info.value.details["reason"] == "redirect"
    with pytest.raises(FetchFailed, match="redirects more than 3"):
        fetch_image(_url(image_host, "/loop"), LOCAL)


def test_redirect_to_private_address_refused(image_host: ThreadingHTTPServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A public host redirecting to the cloud-metadata address: the second hop is refused before connecting.

    The local server plays the public host: its name resolves to 127.0.0.1, which is deemed public here.
    """
    real_problem = fetch_mod.address_problem
    monkeypatch.setattr(fetch_mod, "_resolve",
                        lambda host, port: ["127.0.0.1"] if host == "public.example.test" else [host])
    monkeypatch.setattr(fetch_mod, "address_problem", lambda a: None if a == "127.0.0.1" else real_problem(a))
    port = image_host.server_address[1]
    image_host.state["requests"].clear()  # type: ignore[attr-defined]
    with pytest.raises(FetchRefused, match="169.254.169.254"):
        fetch_image(f"http://public.example.test:{port}/to-metadata", FetchPolicy(timeout_s=5))
    assert [path for path, _ in image_host.state["requests"]] == ["/to-metadata"]  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------------
# Fetch: object storage and local files
# --------------------------------------------------------------------------------------------------------


def test_s3_fetch(s3_env: dict[str, Any], s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/in/scan.nii.gz"
    write_bytes_atomic(PAYLOAD, uri)
    inside = FetchPolicy(allowed_prefixes=(f"s3://{s3_bucket}/in",))
    assert fetch_image(uri, inside) == PAYLOAD
    assert fetch_image(uri, inside, storage_options=s3_env) == PAYLOAD
    assert fetch_image(uri, FetchPolicy(allowed_prefixes=("s3://nvseg-test-*",))) == PAYLOAD

    with pytest.raises(PayloadTooLarge) as info:
        fetch_image(uri, FetchPolicy(allowed_prefixes=(f"s3://{s3_bucket}",), max_bytes=1000))
    assert info.value.details["size"] == len(PAYLOAD)
    with pytest.raises(FetchFailed) as info:
        fetch_image(f"s3://{s3_bucket}/in/missing.nii.gz", inside)
    assert (info.value.http_status, info.value.details["reason"]) == (422, "unreadable")
    for policy in (FetchPolicy(), FetchPolicy(allowed_prefixes=("s3://other-bucket", f"s3://{s3_bucket}/i"))):
        with pytest.raises(FetchRefused) as info:  # no prefix at all (the default), or none that contains it
            fetch_image(uri, policy)
        assert info.value.details["reason"] == "prefix"
    with pytest.raises(FetchRefused):
        fetch_image(uri, FetchPolicy(allowed_schemes=("https",), allowed_prefixes=(f"s3://{s3_bucket}",)))


def test_local_files_only_when_allowed(tmp_path: Path) -> None:
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(PAYLOAD)
    with pytest.raises(FetchRefused):
        fetch_image(str(path), FetchPolicy())
    with pytest.raises(FetchRefused):  # the scheme alone is not enough: a prefix must contain the file
        fetch_image(str(path), FetchPolicy(allowed_schemes=("file",)))
    allowed = FetchPolicy(allowed_schemes=("file",), allowed_prefixes=(str(tmp_path),))
    assert fetch_image(str(path), allowed) == PAYLOAD
    assert fetch_image(path.as_uri(), allowed) == PAYLOAD
    with pytest.raises(PayloadTooLarge):
        fetch_image(str(path), FetchPolicy(allowed_schemes=("file",), allowed_prefixes=(str(tmp_path),), max_bytes=10))
    with pytest.raises(FetchFailed) as info:
        fetch_image(str(tmp_path), allowed)
    assert info.value.http_status == 422


# --------------------------------------------------------------------------------------------------------
# Encodings
# --------------------------------------------------------------------------------------------------------


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _oblique() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = _rotation(0.3, -0.2, 0.5) @ np.diag([0.7, 0.9, 3.0])
    affine[:3, 3] = [-12.5, 33.0, 101.25]
    return affine


AFFINES = {
    "ras": np.diag([1.5, 1.5, 2.0, 1.0]) + np.array([[0, 0, 0, -50.0], [0, 0, 0, -60], [0, 0, 0, 10], [0, 0, 0, 0]]),
    "lps": CT_AFFINE,
    "oblique": _oblique(),
}


def _labels(high: int, shape: tuple[int, int, int] = (9, 7, 5)) -> np.ndarray:
    rng = np.random.default_rng(high)
    labels = rng.integers(0, high + 1, shape)
    labels.flat[0] = high
    return labels


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize(("high", "dtype"), [(132, np.uint8), (345, np.uint16)])
def test_nrrd_zip_roundtrip(name: str, high: int, dtype: type) -> None:
    affine = AFFINES[name]
    labels = _labels(high)
    image = nib.Nifti1Image(labels.astype(np.uint16), affine)
    table = [{"id": 1, "name": "liver", "voxels": np.int64(12), "volume_ml": np.float32(0.5)}]
    body = image_nrrd_zip(image, "CT 01", table)

    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert sorted(archive.namelist()) == ["CT_01_seg.nrrd", "labels.json"]
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in archive.infolist())
        raw = archive.read("CT_01_seg.nrrd")
    header = raw.split(b"\n\n", 1)[0].decode()
    assert "space: left-posterior-superior" in header
    assert "kinds: domain domain domain" in header
    assert "encoding: gzip" in header
    assert f"type: {np.dtype(dtype).name}" in header
    origin = re.search(r"space origin: \((.*)\)", header).group(1)  # type: ignore[union-attr]
    np.testing.assert_allclose([float(v) for v in origin.split(",")],
                               [-affine[0, 3], -affine[1, 3], affine[2, 3]])

    got_labels, got_affine, got_table = read_nrrd_zip(body)
    assert got_labels.dtype == dtype and got_labels.shape == labels.shape
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_allclose(got_affine, image.affine, atol=1e-9)
    assert got_table == [{"id": 1, "name": "liver", "voxels": 12, "volume_ml": 0.5}]
    # the same voxel lands on the same world point in both files
    ijk = np.array([3, 2, 4, 1.0])
    np.testing.assert_allclose(got_affine @ ijk, image.affine @ ijk)
    assert nrrd_zip(labels, affine, "CT 01", table)  # plain labels + affine give the same kind of body


def test_nifti_gz_roundtrip() -> None:
    labels = _labels(200).astype(np.uint8)
    image = nib.Nifti1Image(labels, _oblique())
    back = decode_nifti(nifti_gz(image), uri="mask.nii.gz")
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels)
    np.testing.assert_allclose(back.affine, image.affine, atol=1e-5)


def test_encoding_errors_and_names() -> None:
    with pytest.raises(EncodeError):
        label_dtype(np.array([-1, 2]))
    with pytest.raises(EncodeError):
        label_dtype(np.array([70000]))
    with pytest.raises(EncodeError):
        label_dtype(np.array([0.5]))
    with pytest.raises(EncodeError):
        nrrd_zip(np.zeros((2, 2)), np.eye(4), "x", [])
    with pytest.raises(InputError):
        read_nrrd_zip(b"not a zip")
    with pytest.raises(InputError):
        decode_nrrd(b"garbage")
    assert response_filename("../scan", "nrrd_zip") == "scan_seg.zip"
    assert response_filename("scan", "nifti") == "scan_seg.nii.gz"
    assert response_filename("scan", "preview") == "scan_preview.png"
    assert MEDIA_TYPES == {"nrrd_zip": "application/zip", "nifti": "application/gzip", "json": "application/json",
                           "preview": "image/png"}


# --------------------------------------------------------------------------------------------------------
# Client against a fake service
# --------------------------------------------------------------------------------------------------------


def _error(code: str, message: str, hint: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if hint:
        body["hint"] = hint
    return {"error": body}


class FakeService(_QuietHandler):
    """Canned answers of the nvseg HTTP API; records request bodies in ``state['requests']``."""

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:  # noqa: N802
        state = self.server.state  # type: ignore[attr-defined]
        if self.path == "/v1/health/live":
            self._json(200, {"status": "live"})
        elif self.path == "/v1/health/ready":
            if state.get("ready"):
                self._json(200, {"status": "ready"})
            else:
                self._json(503, _error("not_ready", "model is loading"), {"Retry-After": "7"})
        elif self.path == "/v1/vista3d/info":
            self._json(200, {"version": "0.1.0", "labels": {"1": "liver"}})
        elif self.path.startswith("/v1/jobs/"):
            job_id = self.path.rsplit("/", 1)[1]
            if job_id not in state["jobs"]:
                self._json(404, _error("job_not_found", f"no job {job_id}"))
                return
            polls = state["jobs"][job_id]
            state["jobs"][job_id] += 1
            status = "running" if polls < 2 else ("failed" if job_id == "jfail" else "succeeded")
            self._json(200, {"job_id": job_id, "status": status})
        else:
            self._json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:  # noqa: N802
        state = self.server.state  # type: ignore[attr-defined]
        body = self._body()
        state["requests"].append((self.path, dict(self.headers), body))
        if self.path == "/v1/vista3d/inference":
            payload = json.loads(body)
            image = payload["image"]
            if image == "bad":
                self._json(422, _error("invalid_prompt", "unknown class 'foo'", "see /v1/vista3d/info"))
            elif image == "busy":
                self._json(503, _error("overloaded", "too many requests in flight"), {"Retry-After": "5"})
            elif image == "plain":
                self._send(500, b"Internal Server Error", content_type="text/plain")
            elif image == "detail":
                self._json(422, {"detail": [{"loc": ["body", "image"], "msg": "field required"}]})
            elif payload["output"]["format"] == "json":
                self._json(200, {"labels": [{"id": 1, "name": "liver"}]})
            else:
                self._send(200, b"PK-mask-bytes")
        elif self.path == "/v1/segment":
            if b'name="output_uri"' in body or b'name="output"\r\n\r\njson' in body:
                self._json(200, {"output_uri": "s3://out/x.nii.gz", "labels": []})
            else:
                self._send(200, b"nifti-mask-bytes", content_type="application/gzip")
        elif self.path == "/v1/jobs":
            payload = json.loads(body)
            job_id = "jfail" if payload["image"] == "failing" else "j1"
            state["jobs"][job_id] = 0
            self._json(202, {"job_id": job_id, "status": "queued"})
        else:
            self._json(404, {"detail": "Not Found"})


@pytest.fixture
def service() -> Iterator[ThreadingHTTPServer]:
    with _serve(FakeService, jobs={}, ready=False) as server:
        yield server


@pytest.fixture
def client(service: ThreadingHTTPServer) -> Iterator[NvsegClient]:
    with NvsegClient(_url(service, "").rstrip("/") + "/", timeout_s=5, headers={"X-Test": "1"}) as c:
        yield c


def test_client_health_and_info(client: NvsegClient, service: ThreadingHTTPServer) -> None:
    assert client.live() == {"status": "live"}
    assert client.ready() is False
    service.state["ready"] = True  # type: ignore[attr-defined]
    assert client.ready() is True
    assert client.info()["labels"] == {"1": "liver"}


def test_client_infer_request_shape(client: NvsegClient, service: ThreadingHTTPServer) -> None:
    requests = service.state["requests"]  # type: ignore[attr-defined]
    assert client.infer("https://h/ct.nii.gz") == b"PK-mask-bytes"
    assert json.loads(requests[-1][2]) == {"image": "https://h/ct.nii.gz", "output": {"format": "nrrd_zip"}}
    assert requests[-1][1]["X-Test"] == "1"
    result = client.infer("s3://b/ct.nii.gz", classes=["liver", 3], points={"liver": [[1, 2, 3]]},
                          modality="CT_BODY", output="json")
    assert result == {"labels": [{"id": 1, "name": "liver"}]}
    assert json.loads(requests[-1][2]) == {
        "image": "s3://b/ct.nii.gz",
        "prompts": {"classes": ["liver", 3], "points": {"liver": [[1, 2, 3]]}},
        "modality": "CT_BODY",
        "output": {"format": "json"},
    }
    with pytest.raises(NvsegError):
        client.infer("x", output="png")


@pytest.mark.parametrize(
    ("image", "status", "code", "message", "hint", "retry_after"),
    [
        ("bad", 422, "invalid_prompt", "unknown class 'foo'", "see /v1/vista3d/info", None),
        ("busy", 503, "overloaded", "too many requests in flight", "retry later (after 5 s)", 5.0),
        ("plain", 500, "http_500", "Internal Server Error", None, None),
        ("detail", 422, "http_422", "image: field required", None, None),
    ],
)
def test_client_error_parsing(client: NvsegClient, image: str, status: int, code: str, message: str,
                              hint: str | None, retry_after: float | None) -> None:
    with pytest.raises(ServiceError) as info:
        client.infer(image)
    err = info.value
    assert (err.status, err.code, err.message, err.retry_after) == (status, code, message, retry_after)
    if hint:
        assert hint in (err.hint or "")
    assert f"HTTP {status}" in str(err)
    assert err.exit_code == (2 if status < 500 else 1)


def test_client_segment_file(client: NvsegClient, service: ThreadingHTTPServer, tmp_path: Path) -> None:
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(b"fake-nifti")
    assert client.segment_file(path) == b"nifti-mask-bytes"
    body = service.state["requests"][-1][2]  # type: ignore[attr-defined]
    assert b'name="file"; filename="ct.nii.gz"' in body and b"fake-nifti" in body
    assert b'name="output"\r\n\r\nnifti' in body
    assert b'name="classes"' not in body and b'name="modality"' not in body

    result = client.segment_file(str(path), modality="CT_BODY", classes=["liver", 3],
                                 points=[(1, 2, 3), (4.5, 5, 6)], point_labels=[1, 0],
                                 output_uri="s3://out/x.nii.gz")
    assert result["output_uri"] == "s3://out/x.nii.gz"
    body = service.state["requests"][-1][2]  # type: ignore[attr-defined]
    for field, value in [("modality", b"CT_BODY"), ("classes", b"liver,3"), ("points", b"1,2,3;4.5,5,6"),
                         ("point_labels", b"1,0"), ("output_uri", b"s3://out/x.nii.gz")]:
        assert f'name="{field}"'.encode() + b"\r\n\r\n" + value + b"\r\n" in body
    with pytest.raises(NvsegError):
        client.segment_file(tmp_path / "missing.nii.gz")


def test_client_jobs(client: NvsegClient, service: ThreadingHTTPServer) -> None:
    job_id = client.submit_job("s3://in/ct.nii.gz", "s3://out/ct_seg.nii.gz", classes=[1], modality="CT_BODY")
    assert job_id == "j1"
    sent = json.loads(service.state["requests"][-1][2])  # type: ignore[attr-defined]
    assert sent == {"image": "s3://in/ct.nii.gz", "prompts": {"classes": [1]}, "modality": "CT_BODY",
                    "output_uri": "s3://out/ct_seg.nii.gz"}
    assert client.job(job_id)["status"] == "running"
    assert client.wait(job_id, timeout_s=5, poll_s=0.01)["status"] == "succeeded"
    with pytest.raises(ServiceError) as info:
        client.job("nope")
    assert (info.value.status, info.value.code) == (404, "job_not_found")
    client.submit_job("failing", "s3://out/y.nii.gz")
    with pytest.raises(ServiceError) as info:
        client.wait("jfail", timeout_s=0.05, poll_s=0.2)
    assert info.value.code == "job_wait_timeout"


def test_client_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with NvsegClient(f"http://127.0.0.1:{port}", timeout_s=2) as c, pytest.raises(ServiceError) as info:
        c.live()
    assert info.value.code == "service_unreachable" and info.value.status is None
    assert "serve status" in (info.value.hint or "")
    with pytest.raises(NvsegError):
        NvsegClient("127.0.0.1:8000")


def test_retry_after_and_points_helpers() -> None:
    from datetime import datetime, timezone

    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert format_points([(1, 2, 3), (1.25, 2, 3.0)]) == "1,2,3;1.25,2,3"
    with pytest.raises(NvsegError):
        format_points([(1, 2)])  # type: ignore[list-item]


def test_error_from_response_without_request_body() -> None:
    import httpx

    response = httpx.Response(429, json=_error("rate_limited", "slow down"), headers={"Retry-After": "2"},
                              request=httpx.Request("POST", "http://svc/v1/segment"))
    err = error_from_response(response)
    assert (err.status, err.code, err.retry_after) == (429, "rate_limited", 2.0)


# --------------------------------------------------------------------------------------------------------
# ``nvseg client`` command
# --------------------------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nvseg")
    sub = parser.add_subparsers(dest="command", required=True)
    client_cmd.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli(service: ThreadingHTTPServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
             monkeypatch: pytest.MonkeyPatch) -> None:
    url = _url(service, "")
    assert _cli(["client", "--url", url, "ready"]) == client_cmd.EXIT_NOT_READY
    assert capsys.readouterr().out.strip() == "not ready"

    monkeypatch.setenv("NVSEG_URL", url)  # default --url
    assert _cli(["client", "info"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "0.1.0"

    scan = tmp_path / "ct.nii.gz"
    scan.write_bytes(b"fake")
    out = tmp_path / "mask.nii.gz"
    assert _cli(["client", "segment", str(scan), "--classes", "liver", "--points", "1,2,3", "--out", str(out)]) == 0
    assert out.read_bytes() == b"nifti-mask-bytes"

    out_zip = tmp_path / "seg.zip"
    assert _cli(["client", "infer", "--image", "https://h/ct.nii.gz", "--classes", "liver", "--points",
                 "1,2,3;4,5,6", "--point-labels", "1,0", "--out", str(out_zip)]) == 0
    assert out_zip.read_bytes() == b"PK-mask-bytes"
    sent = json.loads(service.state["requests"][-1][2])  # type: ignore[attr-defined]
    assert sent["prompts"] == {"points": {"liver": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]}, "point_labels": [1, 0]}

    capsys.readouterr()
    assert _cli(["client", "submit", "--image", "s3://in/a.nii.gz", "--output-uri", "s3://o/a.nii.gz", "--wait",
                 "--poll", "0.01"]) == 0
    lines = capsys.readouterr().out
    assert lines.splitlines()[0] == "j1" and '"succeeded"' in lines
    assert _cli(["client", "submit", "--image", "failing", "--output-uri", "s3://o/b.nii.gz", "--wait",
                 "--poll", "0.01"]) == EXIT_VOLUMES_FAILED

    with pytest.raises(ServiceError) as info:
        _cli(["client", "infer", "--image", "bad", "--out", str(tmp_path / "x.zip")])
    assert info.value.code == "invalid_prompt"
    with pytest.raises(NvsegError):
        _cli(["client", "infer", "--image", "x", "--points", "1,2,3"])  # points need one class
