"""Shared pytest fixtures.

Object storage
    ``s3_server`` (session) runs moto's S3 server on a loopback port over real HTTP; ``s3_env`` points the
    standard AWS environment variables at it and returns matching s3fs ``storage_options``; ``s3_bucket``
    creates a fresh, uniquely named bucket. Typical use::

        def test_x(s3_env, s3_bucket):
            uri = f"s3://{s3_bucket}/scan.nii.gz"   # works with storage_options=None (env) or s3_env

Synthetic volumes: the generators live in ``nvseg_ray/synthetic.py`` (``body_phantom``, ``tissue_phantom``,
``torso_ct``, ...); ``tests/helpers.py`` builds NIfTI files from them (``make_nifti``, ...).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

S3_TEST_KEY = "testing"
S3_TEST_SECRET = "testing"
S3_TEST_REGION = "us-east-1"


# --------------------------------------------------------------------------------------------------------
# S3 (moto server on loopback)
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Server:
    """A running moto S3 server: ``endpoint_url`` is ``http://127.0.0.1:<port>``."""

    endpoint_url: str
    host: str
    port: int


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 API as a real HTTP server on 127.0.0.1 (free port), for the whole test session."""
    server_mod = pytest.importorskip("moto.server", reason='moto[server] is needed: pip install "nvseg-ray[test]"')
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no per-request access log lines
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(endpoint_url=f"http://{host}:{port}", host=host, port=port)
    finally:
        server.stop()


@pytest.fixture
def s3_env(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Point the AWS environment at ``s3_server`` and return the equivalent s3fs ``storage_options``.

    Sets AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION; hides any
    developer AWS config (profile, session token, ~/.aws files, service-specific endpoint overrides).
    """
    no_aws_dir = tmp_path_factory.mktemp("no-aws-config")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(no_aws_dir / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(no_aws_dir / "credentials"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_TEST_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_TEST_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", S3_TEST_REGION)
    return {
        "key": S3_TEST_KEY,
        "secret": S3_TEST_SECRET,
        "endpoint_url": s3_server.endpoint_url,
        "client_kwargs": {"region_name": S3_TEST_REGION},
    }


@pytest.fixture
def s3_bucket(s3_env: dict[str, Any]) -> str:
    """Create an empty bucket with a unique name on the moto server and return the name."""
    boto3 = pytest.importorskip("boto3")
    name = f"nvseg-test-{uuid.uuid4().hex[:16]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_env["endpoint_url"],
        aws_access_key_id=S3_TEST_KEY,
        aws_secret_access_key=S3_TEST_SECRET,
        region_name=S3_TEST_REGION,
    )
    client.create_bucket(Bucket=name)
    return name


# --------------------------------------------------------------------------------------------------------
# Tiny generated VISTA3D checkpoints (never downloaded)
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a ~24 MB randomly initialised ``vista3d132`` (width 8) state dict, saved like upstream's model.pt."""
    import torch

    from .model_helpers import make_tiny_state_dict

    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(make_tiny_state_dict(seed=0), path)
    return str(path)


@pytest.fixture(scope="session")
def template_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The ICBM152 brain template and mask at 2 mm (from nilearn) as files: a user template, fast to register to."""
    from .brain_helpers import write_template_2mm

    return write_template_2mm(tmp_path_factory.mktemp("brain-template"))


# --------------------------------------------------------------------------------------------------------
# Hugging Face Hub stand-in (tests/hub_standin.py; the real Hub is never contacted)
# --------------------------------------------------------------------------------------------------------

from pathlib import Path  # noqa: E402  (kept with the fixtures below; this section was appended)


@pytest.fixture(scope="module")
def hf_hub_model_bytes() -> bytes:
    """Bytes ``hf_hub`` serves as ``vista3d_pretrained_model/model.pt``: 48 KiB of seeded random data.

    Override it in a test module to serve something else, e.g. a real tiny checkpoint::

        @pytest.fixture(scope="module")
        def hf_hub_model_bytes(tiny_checkpoint):
            return Path(tiny_checkpoint).read_bytes()
    """
    import random

    return random.Random(1234).randbytes(48 * 1024)


@pytest.fixture(scope="module")
def hf_hub(request: pytest.FixtureRequest, hf_hub_model_bytes: bytes) -> Iterator[Any]:
    """The Hub stand-in (hub + CDN servers on 127.0.0.1) serving ``HF_REPO_ID`` at ``HF_REVISION`` (also "main").

    The repo holds one LFS file, ``vista3d_pretrained_model/model.pt`` (``nvseg_ray.weights.HF_FILENAME``),
    whose bytes are ``hf_hub_model_bytes``, or ``request.param`` when parametrized indirectly::

        @pytest.mark.parametrize("hf_hub", [b"..."], indirect=True)

    Yields a ``tests.hub_standin.FakeHub``: ``.endpoint`` for ``endpoint=`` / ``HF_ENDPOINT``,
    ``.files``, ``.requests`` / ``.clear()``. Module-scoped, so call ``hf_hub.clear()`` before asserting
    on requests. Use ``hf_isolated_env`` (in process) or ``hub_standin.hub_env`` (subprocess) with it.
    For other file sets use ``hub_standin.start_hub(files)`` directly.
    """
    from .hub_standin import HF_FILENAME, FakeFile, start_hub

    content = getattr(request, "param", None)
    if content is None:
        content = hf_hub_model_bytes
    with start_hub({HF_FILENAME: FakeFile(bytes(content))}) as hub:
        yield hub


@pytest.fixture
def hf_isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """huggingface_hub in this process: online, no token / endpoint / proxy, caches under ``tmp_path/hf-home``.

    Returns that HF_HOME. (``tests/test_weights.py`` applies the same isolation to every test.)
    """
    from .hub_standin import isolate_hf_env

    home = tmp_path / "hf-home"
    isolate_hf_env(monkeypatch, home)
    return home


# --------------------------------------------------------------------------------------------------------
# A local Ray cluster (in-process head), shared by the Ray tests
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server) -> Iterator[dict[str, str]]:
    """``ray.init`` with 4 logical CPUs (more than the 2 cores, so CPU stages and actors can coexist) and the
    S3 stand-in's endpoint/credentials in every worker's environment (inherited from this process's, set before
    ``ray.init``). Yields that environment."""
    import os

    ray = pytest.importorskip("ray")
    env = {"AWS_ENDPOINT_URL": s3_server.endpoint_url, "AWS_ACCESS_KEY_ID": S3_TEST_KEY,
           "AWS_SECRET_ACCESS_KEY": S3_TEST_SECRET, "AWS_DEFAULT_REGION": S3_TEST_REGION}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # the workers inherit this process's environment (as a locally started Ray's do): credentials never go
    # through runtime_env, which Ray records in its logs and dashboard APIs
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield env
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------------------------------------
# DICOMweb (a real Orthanc on loopback; skipped, with the reason, when Orthanc is not installed)
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A running Orthanc with its DICOMweb plugin (``tests/orthanc.py``); ``.dicomweb_root`` is its DICOMweb root."""
    from .orthanc import orthanc_or_skip

    with orthanc_or_skip(tmp_path_factory.mktemp("orthanc")) as server:
        yield server
