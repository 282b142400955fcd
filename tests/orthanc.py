"""A real Orthanc DICOMweb server on loopback, for the DICOMweb tests (``tests/test_dicomweb.py`` and others).

Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``; ``scripts/bootstrap.sh`` installs them when it runs as root)
is started as a child process with its own JSON configuration in a temporary folder: storage and index there,
the DICOMweb plugin loaded with root ``/dicom-web/``, the DICOM (DIMSE) port off, remote access off (it listens on
127.0.0.1 only) and, when asked, HTTP basic authentication with the given users. It starts in well under a
second; :func:`start_orthanc` polls ``GET /system`` until it answers. It is stopped by its PID (terminate, then
kill after a timeout) -- never by name, so other people's servers on the machine are left alone.

The lead wraps it as session fixtures in ``tests/conftest.py``::

    @pytest.fixture(scope="session")
    def orthanc(tmp_path_factory):
        from .orthanc import orthanc_or_skip
        with orthanc_or_skip(tmp_path_factory.mktemp("orthanc")) as server:
            yield server

Uploading test material: :meth:`OrthancServer.upload` (Orthanc's ``POST /instances``, one file at a time) or
:meth:`OrthancServer.stow` (STOW-RS through the DICOMweb plugin).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Where the Debian packages put the server and the plugin.
ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
#: Readiness: Orthanc 1.10 answers ``/system`` in < 1 s on this machine; 20 s covers a loaded 2-core CI box.
READY_TIMEOUT_S = 20.0
#: Terminate -> kill: Orthanc flushes its SQLite index on SIGTERM in well under a second.
STOP_TIMEOUT_S = 10.0
#: One HTTP request of the helpers (upload, delete, readiness probe).
REQUEST_TIMEOUT_S = 30.0


def orthanc_missing_reason() -> str | None:
    """Why Orthanc cannot be started here (a sentence for ``pytest.skip``), or None when it can."""
    binary = shutil.which("Orthanc") or (ORTHANC_BIN if os.access(ORTHANC_BIN, os.X_OK) else None)
    if binary is None:
        return ("Orthanc is not installed (Debian packages orthanc + orthanc-dicomweb: scripts/bootstrap.sh "
                "installs them when it runs as root; or apt-get install orthanc orthanc-dicomweb)")
    if not os.path.exists(DICOMWEB_PLUGIN):
        return f"the Orthanc DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}; apt-get install orthanc-dicomweb)"
    return None


def _orthanc_binary() -> str:
    return shutil.which("Orthanc") or ORTHANC_BIN


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class OrthancServer:
    """A running Orthanc: ``url`` is ``http://127.0.0.1:<port>``, ``dicomweb_root`` ``<url>/dicom-web``.

    ``users`` maps user name -> password when basic authentication is on (empty: no authentication); the
    helpers below authenticate with the first user.
    """

    url: str
    port: int
    workdir: Path
    process: subprocess.Popen
    users: Mapping[str, str] = field(default_factory=dict, repr=False)
    log_file: Any = field(default=None, repr=False)

    @property
    def dicomweb_root(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def log_tail(self, n_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""

    # -- HTTP helpers -----------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        if not self.users:
            return {}
        user, password = next(iter(self.users.items()))
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        """``(status, body)`` of one request to Orthanc's REST API (``path`` starts with ``/``)."""
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={**self._headers(), **dict(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def upload(self, items: Iterable[Any]) -> list[str]:
        """Store DICOM instances with ``POST /instances`` and return Orthanc's instance ids.

        ``items``: ``pydicom.Dataset`` objects, raw DICOM ``bytes`` or file paths.
        """
        ids = []
        for item in items:
            raw = _as_bytes(item)
            status, body = self.request("POST", "/instances", raw, {"Content-Type": "application/dicom"})
            if status != 200:
                raise RuntimeError(f"Orthanc refused an upload: HTTP {status}: {body[:300]!r}")
            ids.append(json.loads(body)["ID"])
        return ids

    def stow(self, items: Sequence[Any]) -> int:
        """Store DICOM instances with one STOW-RS request (``POST <root>/studies``); returns the HTTP status."""
        boundary = "nvseg-test-boundary-7c1f"
        parts = [b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + _as_bytes(i) + b"\r\n"
                 for i in items]
        body = b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        status, answer = self.request("POST", "/dicom-web/studies", body,
                                      {"Content-Type": content_type, "Accept": "application/dicom+json"})
        if status not in (200, 202):
            raise RuntimeError(f"STOW-RS refused: HTTP {status}: {answer[:300]!r}")
        return status

    def delete_study(self, study_instance_uid: str) -> None:
        """Remove a study (looked up by its StudyInstanceUID) so a test can start from an empty one."""
        status, body = self.request("POST", "/tools/lookup", study_instance_uid.encode())
        if status != 200:
            return
        for hit in json.loads(body):
            if hit.get("Type") == "Study":
                self.request("DELETE", f"/studies/{hit['ID']}")

    # -- lifetime ---------------------------------------------------------------------------------------------

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Terminate the server by its PID; kill it when it is still there after ``timeout_s``."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        if self.log_file is not None:
            self.log_file.close()


def _as_bytes(item: Any) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, (str, os.PathLike)):
        return Path(item).read_bytes()
    import pydicom  # a pydicom Dataset

    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, item, enforce_file_format=True)
    return buffer.getvalue()


def orthanc_config(workdir: Path, port: int, users: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The JSON configuration :func:`start_orthanc` writes (storage and index inside ``workdir``)."""
    config: dict[str, Any] = {
        "Name": "nvseg-test",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "HttpPort": port,
        "DicomServerEnabled": False,   # no DIMSE port: only HTTP (DICOMweb + REST)
        "RemoteAccessAllowed": False,  # loopback only
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": dict(users or {}),
        "HttpCompressionEnabled": False,
        "StorageCompression": False,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
    }
    return config


def start_orthanc(workdir: str | os.PathLike[str], *, users: Mapping[str, str] | None = None,
                  ready_timeout_s: float = READY_TIMEOUT_S, attempts: int = 3) -> OrthancServer:
    """Start Orthanc with a fresh configuration in ``workdir`` on a free loopback port and wait until it answers.

    Args:
        workdir: an (empty) folder for the configuration, storage, index and ``orthanc.log``.
        users: basic-authentication users (name -> password); None or empty: no authentication.
        ready_timeout_s: how long to poll ``GET /system``.
        attempts: ports tried (another process can take the free port between the probe and Orthanc's bind).

    Raises:
        RuntimeError: Orthanc is not installed, exited, or did not answer in time (the message quotes its log).
    """
    reason = orthanc_missing_reason()
    if reason:
        raise RuntimeError(reason)
    base = Path(workdir)
    last_error = ""
    for attempt in range(attempts):
        work = base / f"run{attempt}"
        (work / "storage").mkdir(parents=True, exist_ok=True)
        (work / "index").mkdir(parents=True, exist_ok=True)
        port = _free_port()
        config_path = work / "orthanc.json"
        config_path.write_text(json.dumps(orthanc_config(work, port, users), indent=2))
        log = open(work / "orthanc.log", "wb")
        proc = subprocess.Popen([_orthanc_binary(), str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=str(work))
        server = OrthancServer(url=f"http://127.0.0.1:{port}", port=port, workdir=work, process=proc,
                               users=dict(users or {}), log_file=log)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, _ = server.request("GET", "/system")
            except OSError:  # not listening yet
                status = 0
            if status in (200, 401):  # 401: up, with authentication on
                if status == 200 or users:
                    return server
            time.sleep(0.1)
        server.stop()
        last_error = (f"Orthanc {'exited with status ' + str(proc.returncode) if proc.returncode else 'did not answer'}"
                      f" (port {port}); log:\n{server.log_tail()}")
    raise RuntimeError(last_error)


@contextmanager
def running_orthanc(workdir: str | os.PathLike[str], *, users: Mapping[str, str] | None = None
                    ) -> Iterator[OrthancServer]:
    """:func:`start_orthanc` as a context manager (stopped on exit)."""
    server = start_orthanc(workdir, users=users)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def orthanc_or_skip(workdir: str | os.PathLike[str], *, users: Mapping[str, str] | None = None
                    ) -> Iterator[OrthancServer]:
    """:func:`running_orthanc`, or ``pytest.skip`` with the reason when Orthanc is not installed here."""
    import pytest

    reason = orthanc_missing_reason()
    if reason:
        pytest.skip(reason)
    with running_orthanc(workdir, users=users) as server:
        yield server
