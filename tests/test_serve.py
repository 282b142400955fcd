"""The Ray Serve app end to end: real HTTP against serve.run on the local Ray test cluster, tiny model."""

from __future__ import annotations

import concurrent.futures as cf
import gzip
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import yaml

from nvseg_ray.client import NvsegClient
from nvseg_ray.config import InferenceConfig
from nvseg_ray.errors import ServiceError
from nvseg_ray.serving.encode import read_nrrd_zip
from nvseg_ray.serving.service import DEFAULT_MAX_INFLIGHT, DEFAULT_REQUEST_TIMEOUT_S, ServeSettings

from .brain_helpers import make_head, save_head, template_of
from .model_helpers import TEST_PATCH, body_phantom, save_volume, segment_once

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("ray_cluster")
TIMEOUT_S = 25.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Files(SimpleHTTPRequestHandler):
    """Serves the test volumes; /slow/... sleeps past the service's request timeout."""

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/slow/"):
            time.sleep(TIMEOUT_S + 15)
        return super().do_GET()


@pytest.fixture(scope="module")
def volumes(tmp_path_factory, template_paths):
    root = tmp_path_factory.mktemp("served")
    # a raw T1 head for the brain workflow, coarse and uint8 so that it stays under max_upload_mb
    save_head(root / "head.nii.gz", make_head(template_of(template_paths), "rot-scale-oblique", spacing=(2.2, 2.2, 2.2),
                                              as_uint8=True))
    save_volume(root / "ct.nii.gz", body_phantom((48, 44, 22), seed=5), np.diag([1.5, 1.5, 3.0, 1.0]))
    save_volume(root / "ct2.nii.gz", body_phantom((40, 42, 20), seed=6), np.diag([-1.4, 1.4, 2.8, 1.0]))
    (root / "garbage.nii.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 100)
    (root / "big.nii.gz").write_bytes(np.random.default_rng(0).bytes(int(1.5 * 2**20)))
    return root


@pytest.fixture(scope="module")
def file_server(volumes):
    handler = lambda *a, **k: _Files(*a, directory=str(volumes), **k)  # noqa: E731
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@contextmanager
def running_service(args: dict) -> Iterator[str]:
    """serve.run the app with ``args`` on a free loopback port until it is ready; yields its base URL."""
    from ray import serve

    from serve_apps.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="nvseg", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        yield url
    finally:
        serve.shutdown()


def wait_ready(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/health/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail("the service did not become ready")


@pytest.fixture(scope="module")
def service(tiny_checkpoint, volumes, template_paths):
    args = {"checkpoint": tiny_checkpoint, "patch_size": list(TEST_PATCH), "device": "cpu", "max_upload_mb": 1.0,
            "request_timeout_s": TIMEOUT_S, "allowed_hosts": ["127.0.0.1"], "allow_private_networks": True,
            # the s3_bucket fixture's buckets, and the README examples' s3://bucket/ct (in) and s3://bucket/jobs (out)
            "allowed_input_prefixes": ["s3://nvseg-test-*", "s3://bucket/ct"],
            "allowed_output_prefixes": ["s3://nvseg-test-*", "s3://bucket/jobs"],
            "brain": {"template": template_paths[0], "template_mask": template_paths[1]}}
    with running_service(args) as url:
        yield url


def engine_labels(checkpoint: str, path: Path, **prompts) -> np.ndarray:
    cfg = InferenceConfig(checkpoint=checkpoint, patch_size=TEST_PATCH, device="cpu", **prompts)
    return segment_once(cfg, path).labels


def _error(resp: httpx.Response) -> dict:
    assert resp.headers["content-type"].startswith("application/json"), resp.text[:200]
    return resp.json()["error"]


def test_health_info_and_docs(service):
    client = NvsegClient(service)
    assert client.live()["status"] == "live"
    assert client.ready() is True
    info = client.info()
    assert len(info["labels"]) == 345 and len(info["model"]["sha256"]) == 64
    backend = info["model"]["backend"]  # how the model replicas run the network, and why (a CPU: torch)
    assert backend["backend"] == "torch" and backend["code"] == "auto_torch" and "CUDA" in backend["reason"]
    assert len(info["modalities"]["CT_BODY"]) == 117
    raw = httpx.get(f"{service}/openapi.json")
    spec = raw.json()
    assert {"/v1/vista3d/inference", "/v1/segment", "/v1/jobs", "/v1/jobs/{job_id}"} <= set(spec["paths"])
    assert httpx.get(f"{service}/docs").status_code == 200


def test_nim_inference_default_zip_equals_engine(service, file_server, volumes, tiny_checkpoint):
    resp = httpx.post(f"{service}/v1/vista3d/inference", timeout=120,
                      json={"image": f"{file_server}/ct.nii.gz", "prompts": {"classes": ["liver", "spleen", 5]}})
    assert resp.status_code == 200, resp.text[:500]
    assert resp.headers["content-type"] == "application/zip"
    labels, affine, table = read_nrrd_zip(resp.content)
    expected = engine_labels(tiny_checkpoint, volumes / "ct.nii.gz", classes=["liver", "spleen", 5])
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_allclose(affine, nib.load(str(volumes / "ct.nii.gz")).affine, atol=1e-4)
    assert {r["id"] for r in table} == set(np.unique(expected)) - {0}


@pytest.mark.parametrize("fmt", ["nifti", "json", "preview"])
def test_inference_other_formats_and_everything_mode(service, s3_env, s3_bucket, volumes, tiny_checkpoint, fmt):
    import s3fs

    s3fs.S3FileSystem(**s3_env).put(str(volumes / "ct2.nii.gz"), f"{s3_bucket}/in/ct2.nii.gz")
    out = NvsegClient(service).infer(f"s3://{s3_bucket}/in/ct2.nii.gz", output=fmt)  # no prompts: CT_BODY
    expected = engine_labels(tiny_checkpoint, volumes / "ct2.nii.gz", modality="CT_BODY")
    if fmt == "nifti":
        image = nib.Nifti1Image.from_bytes(gzip.decompress(out))
        np.testing.assert_array_equal(np.asanyarray(image.dataobj), expected)
    elif fmt == "preview":  # the PNG preview, rendered for this request from its mask and input
        from PIL import Image

        assert out.startswith(b"\x89PNG\r\n\x1a\n")
        assert min(Image.open(io.BytesIO(out)).size) > 32
    else:
        assert {r["id"]: r["voxels"] for r in out["labels"]} == {
            int(i): int((expected == i).sum()) for i in np.unique(expected) if i}
        quality = out["quality"]  # statistics per structure and the QC flags of the same mask
        assert {s["id"] for s in quality["structures"]} == {r["id"] for r in out["labels"]}
        assert all({"code", "reason"} <= set(flag) for flag in quality["flags"])


def test_upload_and_output_uri(service, volumes, tiny_checkpoint, s3_env, s3_bucket):
    import s3fs

    client = NvsegClient(service)
    mask = client.segment_file(volumes / "ct.nii.gz", classes=["liver", 3])
    image = nib.Nifti1Image.from_bytes(gzip.decompress(mask))
    np.testing.assert_array_equal(np.asanyarray(image.dataobj),
                                  engine_labels(tiny_checkpoint, volumes / "ct.nii.gz", classes=["liver", 3]))
    target = f"s3://{s3_bucket}/served/ct_seg.nii.gz"
    written = client.segment_file(volumes / "ct.nii.gz", classes=["liver"], output_uri=target)
    assert written["output_uri"] == target
    fs = s3fs.S3FileSystem(**s3_env)
    assert fs.exists(target) and json.loads(fs.cat(target.replace(".nii.gz", ".json")))["prompts"]["class_ids"] == [1]


def test_async_job(service, file_server, s3_env, s3_bucket):
    import s3fs

    client = NvsegClient(service)
    target = f"s3://{s3_bucket}/jobs/ct_seg.nii.gz"
    job_id = client.submit_job(f"{file_server}/ct.nii.gz", target, classes=["spleen"])
    early = httpx.get(f"{service}/v1/jobs/{job_id}/result")
    assert early.status_code in (200, 409)
    done = client.wait(job_id, timeout_s=120)
    assert done["status"] == "succeeded", done
    assert s3fs.S3FileSystem(**s3_env).exists(target)
    result = httpx.get(f"{service}/v1/jobs/{job_id}/result").json()
    assert result["output_uri"] == target
    assert httpx.get(f"{service}/v1/jobs/nope").status_code == 404
    bad = client.submit_job(f"{file_server}/garbage.nii.gz", f"s3://{s3_bucket}/jobs/x.nii.gz", classes=[1])
    failed = client.wait(bad, timeout_s=60)
    assert failed["status"] == "failed" and failed["error"]["code"] in ("truncated_file", "unreadable_file")


def test_brain_t1_job_reverts_onto_the_input_grid(service, file_server, volumes, s3_env, s3_bucket):
    import s3fs

    client = NvsegClient(service)
    target = f"s3://{s3_bucket}/brain/head_seg.nii.gz"
    job_id = client.submit_job(f"{file_server}/head.nii.gz", target, classes=[214, 215, 345], modality="MRI_BRAIN")
    done = client.wait(job_id, timeout_s=300)
    assert done["status"] == "succeeded", done
    fs = s3fs.S3FileSystem(**s3_env)
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(fs.cat(target)))
    head = nib.load(volumes / "head.nii.gz")
    assert mask.shape == head.shape and mask.get_data_dtype() == np.uint16
    np.testing.assert_allclose(mask.affine, head.affine, atol=1e-5)
    assert set(np.unique(np.asanyarray(mask.dataobj)).tolist()) <= {0, 214, 215, 345}
    report = json.loads(fs.cat(target.replace(".nii.gz", ".json")))
    assert report["brain"]["skull_strip"] == "atlas" and report["brain"]["correlation"] > 0.9


@pytest.mark.parametrize("kind,status,code", [
    ("malformed_json", 400, "invalid_json"),
    ("missing_image", 422, "invalid_request"),
    ("unknown_class", 422, "invalid_prompt"),
    ("bad_modality", 422, "invalid_prompt"),
    ("scheme", 403, "url_not_allowed"),
    ("host", 403, "url_not_allowed"),
    ("unreadable", 422, None),
    ("not_found", 422, "image_fetch_failed"),
    ("too_large_fetch", 413, "payload_too_large"),
    ("too_large_upload", 413, "payload_too_large"),
    ("garbage_upload", 422, None),
    ("output_not_allowed", 403, "output_not_allowed"),
    ("timeout", 504, None),
])
def test_user_errors_are_json_never_500(service, file_server, volumes, kind, status, code):
    post = lambda body: httpx.post(f"{service}/v1/vista3d/inference", json=body, timeout=120)  # noqa: E731
    if kind == "malformed_json":
        resp = httpx.post(f"{service}/v1/vista3d/inference", content=b"{not json", timeout=30,
                          headers={"content-type": "application/json"})
    elif kind == "missing_image":
        resp = post({"prompts": {"classes": ["liver"]}})
    elif kind == "unknown_class":
        resp = post({"image": f"{file_server}/ct.nii.gz", "prompts": {"classes": ["livr"]}})
        assert "did you mean 'liver'" in _error(resp)["message"]
    elif kind == "bad_modality":
        resp = post({"image": f"{file_server}/ct.nii.gz", "modality": "PET"})
    elif kind == "scheme":
        resp = post({"image": "file:///etc/passwd"})
    elif kind == "host":
        resp = post({"image": "http://169.254.169.254/latest/meta-data"})
    elif kind == "unreadable":
        resp = post({"image": f"{file_server}/garbage.nii.gz", "prompts": {"classes": [1]}})
    elif kind == "not_found":
        resp = post({"image": f"{file_server}/nope.nii.gz", "prompts": {"classes": [1]}})
    elif kind == "too_large_fetch":
        resp = post({"image": f"{file_server}/big.nii.gz", "prompts": {"classes": [1]}})
    elif kind == "too_large_upload":
        resp = httpx.post(f"{service}/v1/segment", files={"file": ("big.nii.gz", (volumes / "big.nii.gz").read_bytes())},
                          data={"classes": "liver"}, timeout=60)
    elif kind == "garbage_upload":
        resp = httpx.post(f"{service}/v1/segment", files={"file": ("g.nii.gz", b"garbage")}, data={"classes": "1"},
                          timeout=60)
    elif kind == "output_not_allowed":
        resp = httpx.post(f"{service}/v1/segment", files={"file": ("ct.nii.gz", (volumes / "ct.nii.gz").read_bytes())},
                          data={"classes": "1", "output_uri": "/etc/evil.nii.gz"}, timeout=60)
    else:  # timeout: the image server answers after the service's request timeout
        resp = post({"image": f"{file_server}/slow/ct.nii.gz", "prompts": {"classes": [1]}})
    assert resp.status_code == status, resp.text[:500]
    err = _error(resp)
    assert err["message"] and (code is None or err["code"] == code)


def test_concurrent_requests_and_overload(service, file_server, volumes, tiny_checkpoint):
    expected = engine_labels(tiny_checkpoint, volumes / "ct.nii.gz", classes=["liver", "spleen"])
    body = {"image": f"{file_server}/ct.nii.gz", "prompts": {"classes": ["liver", "spleen"]},
            "output": {"format": "nifti"}}

    def call(_):
        return httpx.post(f"{service}/v1/vista3d/inference", json=body, timeout=180)

    with cf.ThreadPoolExecutor(DEFAULT_MAX_INFLIGHT) as pool:  # within the admission limit: all succeed
        for resp in pool.map(call, range(DEFAULT_MAX_INFLIGHT)):
            assert resp.status_code == 200, resp.text[:300]
            np.testing.assert_array_equal(
                np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(resp.content)).dataobj), expected)
    with cf.ThreadPoolExecutor(16) as pool:  # far beyond it: 503 + Retry-After for the excess, others correct
        responses = list(pool.map(call, range(16)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    for resp in responses:
        if resp.status_code == 503:
            assert int(resp.headers["retry-after"]) >= 1 and _error(resp)["code"] == "overloaded"
        else:
            np.testing.assert_array_equal(
                np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(resp.content)).dataobj), expected)
    assert NvsegClient(service).ready()  # a burst of failures never affects later requests


def test_client_error_and_cli(service, file_server, tmp_path):
    import subprocess
    import sys

    with pytest.raises(ServiceError) as err:
        NvsegClient(service).infer(f"{file_server}/ct.nii.gz", classes=["nope-class"])
    assert err.value.status == 422 and err.value.code == "invalid_prompt"
    out = tmp_path / "seg.zip"
    done = subprocess.run([sys.executable, "-m", "nvseg_ray", "client", "--url", service, "infer", "--image",
                           f"{file_server}/ct.nii.gz", "--classes", "liver", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert read_nrrd_zip(out.read_bytes())[0].shape == (48, 44, 22)


def test_serve_config_validates():
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((REPO / "serve_apps" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc)
    app = schema.applications[0]
    assert app.import_path == "serve_apps.app:build_app"
    settings = ServeSettings.from_args(app.args)
    assert settings.default_modality == "CT_BODY" and not settings.allow_private_networks
    assert {d.name for d in app.deployments} == {"Gateway", "Model", "JobStore"}
    assert DEFAULT_REQUEST_TIMEOUT_S == 300.0 and DEFAULT_MAX_INFLIGHT == 4


def test_readme_curl_examples(service, volumes, s3_env, tmp_path):
    import re
    import shlex
    import shutil
    import subprocess

    import boto3

    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    s3 = boto3.client("s3", endpoint_url=s3_env["endpoint_url"])
    if "bucket" not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket="bucket")
    s3.upload_file(str(volumes / "ct.nii.gz"), "bucket", "ct/a.nii.gz")
    shutil.copy(volumes / "ct.nii.gz", tmp_path / "scan.nii.gz")
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    commands = [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip().startswith("curl ")]
    assert len(commands) >= 5
    for command in commands:
        argv = shlex.split(command.replace("http://127.0.0.1:8000", service))
        argv.insert(1, "--fail-with-body")
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, timeout=180)
        assert done.returncode == 0, f"{command}\n{done.stdout[-1000:]!r}\n{done.stderr[-1000:]!r}"
    assert read_nrrd_zip((tmp_path / "seg.zip").read_bytes())[0].shape == (48, 44, 22)
    assert nib.Nifti1Image.from_bytes(gzip.decompress((tmp_path / "scan_seg.nii.gz").read_bytes())).shape == (48, 44, 22)
    job = json.loads((tmp_path / "job.json").read_text())
    assert NvsegClient(service).wait(job["job_id"], timeout_s=120)["status"] == "succeeded"
    assert json.loads((tmp_path / "stats.json").read_text())["labels"] is not None
