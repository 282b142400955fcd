"""Hostile requests against the Serve app (issue 11): body caps, error contract, shed work, job admission/orphans.

Real HTTP to one module-scoped Serve app (``tests/test_serve.py::running_service``) with small limits; images
come from the moto S3 stand-in or are uploaded. Replicas are killed with ``ray.kill`` (the last two tests).
"""

from __future__ import annotations

import ast
import builtins
import concurrent.futures as cf
import importlib
import json
import pkgutil
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from nvseg_ray.errors import NvsegError
from nvseg_ray.serving.jobs import CODE_JOB_ORPHANED, JobTable

from .model_helpers import TEST_PATCH, body_phantom, save_volume
from .test_serve import running_service, wait_ready

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 8.0
JSON_KB = 64
MAX_POINTS = 8
MAX_JOBS = 3
LEASE_S = 3.0
BUCKET = "nvseg-hostile"
INTERNALS = ("Traceback", "ray::", "pid=", "actor_id", "ActorID", "\x1b[", "File \"/")


@pytest.fixture(scope="module")
def vols(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    save_volume(root / "ct.nii.gz", body_phantom((48, 44, 22), seed=5), np.diag([1.5, 1.5, 3.0, 1.0]))
    # ~20 s of model time on 2 CPU cores: outlives the request timeout
    save_volume(root / "slow.nii.gz", body_phantom((96, 96, 48), seed=7), np.diag([1.5, 1.5, 3.0, 1.0]))
    assert (root / "slow.nii.gz").stat().st_size < 2**20
    return root


@pytest.fixture(scope="module")
def svc(ray_cluster, tiny_checkpoint, s3_server):
    import boto3

    from .conftest import S3_TEST_KEY, S3_TEST_REGION, S3_TEST_SECRET

    boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id=S3_TEST_KEY,
                 aws_secret_access_key=S3_TEST_SECRET, region_name=S3_TEST_REGION).create_bucket(Bucket=BUCKET)
    args = {"checkpoint": tiny_checkpoint, "patch_size": list(TEST_PATCH), "device": "cpu", "max_upload_mb": 1.0,
            "request_timeout_s": TIMEOUT_S, "max_json_kb": JSON_KB, "max_points": MAX_POINTS, "max_jobs": MAX_JOBS,
            "job_concurrency": 1, "job_lease_s": LEASE_S, "allowed_input_prefixes": [f"s3://{BUCKET}/in"],
            "allowed_output_prefixes": [f"s3://{BUCKET}/out"]}
    with running_service(args) as url:
        yield url


def _err(resp: httpx.Response) -> dict:
    assert resp.headers["content-type"].startswith("application/json"), (resp.status_code, resp.text[:300])
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert err["code"] and err["message"] and err["hint"], err
    assert not any(s in resp.text for s in INTERNALS), resp.text[:2000]
    return err


def _raw_http(url: str, head: str, body_chunks=(), wait_s: float = 10.0) -> tuple[int, bytes]:
    """Send a request head and some body bytes over a socket, then read the response without finishing the body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        sock.sendall(head.encode())
        for chunk in body_chunks:
            sock.sendall(chunk)
        data = b""
        start = time.monotonic()
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 10:
            if time.monotonic() - start > wait_s:
                break
            try:
                got = sock.recv(65536)
            except TimeoutError:
                break
            if not got:
                break
            data += got
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data


def _upload(url, path_or_bytes, name="ct.nii.gz", timeout=60, **data):
    raw = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return httpx.post(f"{url}/v1/segment", files={"file": (name, raw)}, data=data, timeout=timeout)


# -- 6: request bodies ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/vista3d/inference", "/v1/segment"])
def test_declared_100gb_body_is_refused_at_once(svc, path):
    start = time.monotonic()
    status, data = _raw_http(svc, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  f"Content-Length: {100 * 10**9}\r\n\r\n", [b"{" * 1000])
    assert status == 413, data[:500]
    assert time.monotonic() - start < 8
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "payload_too_large"


def test_chunked_upload_is_cut_off_as_it_arrives(svc):
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.nii.gz"\r\n\r\n'
    chunks = [part + b"x" * 65536] + [b"x" * 65536] * 19  # 1.25 MiB > 1 MiB + form overhead; never terminated
    body = [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks]
    status, data = _raw_http(svc, "POST /v1/segment HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                  "Content-Type: multipart/form-data; boundary=b\r\n\r\n", body, wait_s=15)
    assert status == 413, data[:500]


def test_json_body_cap(svc):
    big = {"image": "s3://b/x.nii.gz", "prompts": {"classes": ["liver"] * (JSON_KB * 1024 // 8)}}
    resp = httpx.post(f"{svc}/v1/vista3d/inference", json=big, timeout=30)
    assert resp.status_code == 413 and _err(resp)["code"] == "payload_too_large"
    raw = json.dumps(big).encode()
    resp = httpx.post(f"{svc}/v1/jobs", content=iter([raw[i:i + 4096] for i in range(0, len(raw), 4096)]),
                      timeout=30, headers={"content-type": "application/json"})  # streamed: chunked, no length
    assert resp.status_code == 413 and _err(resp)["code"] == "payload_too_large"


# -- 8 / 13: error contract ------------------------------------------------------------------------------


@pytest.mark.parametrize("case,status", [
    ("unknown_route", 404), ("wrong_method", 405), ("no_boundary", 400), ("long_name", None),
    ("labels_without_points", 422), ("float_labels", 422), ("word_labels", 422), ("nan_form_points", 422),
    ("too_many_points", 422), ("superscript_class", 422), ("json_nan_points", 422), ("json_inf_points", 422),
    ("json_float_labels", 422), ("json_labels_without_points", 422), ("json_superscript_point_key", 422),
])
def test_error_bodies_have_code_message_hint(svc, vols, case, status):
    ct = vols / "ct.nii.gz"
    post_json = lambda text: httpx.post(f"{svc}/v1/vista3d/inference", content=text.encode(), timeout=30,  # noqa: E731
                                        headers={"content-type": "application/json"})
    image = '"image": "s3://nowhere/ct.nii.gz"'
    if case == "unknown_route":
        resp = httpx.get(f"{svc}/v1/nope", timeout=30)
    elif case == "wrong_method":
        resp = httpx.get(f"{svc}/v1/segment", timeout=30)
        assert "POST" in _err(resp)["hint"]
    elif case == "no_boundary":
        resp = httpx.post(f"{svc}/v1/segment", content=b"--x\r\n", timeout=30,
                          headers={"content-type": "multipart/form-data"})
    elif case == "long_name":
        resp = _upload(svc, ct, name="a" * 5000 + ".nii.gz", classes="liver", output="json")
        assert resp.status_code in (200, 400, 422), resp.text[:300]
        if resp.status_code == 200:
            return
        status = resp.status_code
    elif case == "labels_without_points":
        resp = _upload(svc, ct, classes="liver", point_labels="1")
    elif case == "float_labels":
        resp = _upload(svc, ct, classes="liver", points="10,10,5", point_labels="1.5")
    elif case == "word_labels":
        resp = _upload(svc, ct, classes="liver", points="10,10,5", point_labels="yes")
    elif case == "nan_form_points":
        resp = _upload(svc, ct, classes="liver", points="nan,10,5")
    elif case == "too_many_points":
        resp = _upload(svc, ct, classes="liver", points=";".join(["10,10,5"] * (MAX_POINTS + 1)))
    elif case == "superscript_class":
        resp = _upload(svc, ct, classes="²")
    elif case == "json_nan_points":
        resp = post_json('{%s, "prompts": {"points": {"liver": [[NaN, 1, 2]]}}}' % image)
    elif case == "json_inf_points":
        resp = post_json('{%s, "prompts": {"points": {"liver": [[1, Infinity, 2]]}}}' % image)
    elif case == "json_float_labels":
        resp = post_json('{%s, "prompts": {"points": {"liver": [[1, 1, 2]]}, "point_labels": [0.5]}}' % image)
    elif case == "json_labels_without_points":
        resp = post_json('{%s, "prompts": {"classes": ["liver"], "point_labels": [1]}}' % image)
    else:
        resp = post_json('{%s, "prompts": {"points": {"²": [[1, 1, 2]]}}}' % image)
    assert resp.status_code == status, resp.text[:500]
    _err(resp)


def test_non_latin1_upload_names_and_s3_keys(svc, vols, s3_env):
    import s3fs

    resp = _upload(svc, vols / "ct.nii.gz", name="Zürich_頭部.nii.gz", classes="liver")
    assert resp.status_code == 200, resp.text[:500]
    cd = resp.headers["content-disposition"]
    assert cd.startswith('attachment; filename="') and "filename*=UTF-8''Z%C3%BCrich_%E9%A0%AD%E9%83%A8_seg.nii.gz" in cd
    key = f"{BUCKET}/in/Ωmega_患者.nii.gz"
    s3fs.S3FileSystem(**s3_env).put(str(vols / "ct.nii.gz"), key)
    resp = httpx.post(f"{svc}/v1/vista3d/inference", json={"image": f"s3://{key}", "prompts": {"classes": [1]}},
                      timeout=60)
    assert resp.status_code == 200, resp.text[:500]
    assert "filename*=UTF-8''%CE%A9mega_%E6%82%A3%E8%80%85_seg.zip" in resp.headers["content-disposition"]


def test_every_error_class_yields_a_hint():
    """Walk every NvsegError subclass of the package: an error raised without a hint still gets one."""
    import serve_apps.app as app_mod
    from nvseg_ray.serving.service import error_body

    for mod in pkgutil.walk_packages([str(REPO / "nvseg_ray")], "nvseg_ray."):
        if mod.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(mod.name)
        except ImportError:  # optional extras
            continue
    seen, todo = set(), [NvsegError]
    while todo:
        cls = todo.pop()
        seen.add(cls)
        todo += [c for c in cls.__subclasses__() if c not in seen]
    assert len(seen) > 15 and app_mod.ModelUnavailable in seen
    for cls in seen:
        try:
            err = cls("something failed")
        except TypeError:  # needs extra arguments: built by its own factory with a hint
            continue
        body = error_body(err)["error"]
        assert body["hint"] and body["code"] and body["message"], cls


def test_http_raise_sites_give_hints():
    """Every ``raise SomeError(...)`` in the HTTP layer passes ``hint=`` (the catch-all default is a fallback)."""
    files = ["serve_apps/app.py", "nvseg_ray/serving/service.py", "nvseg_ray/serving/jobs.py",
             "nvseg_ray/serving/limits.py"]
    missing = []
    for name in files:
        for node in ast.walk(ast.parse((REPO / name).read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                builtin = hasattr(builtins, called)
                if called[:1].isupper() and not builtin and not any(k.arg == "hint" for k in node.exc.keywords):
                    missing.append(f"{name}:{node.lineno} {called}")
    assert not missing, missing


def test_internal_errors_never_echo_the_exception():
    from serve_apps.app import internal_error_response

    resp = internal_error_response(RuntimeError("secret /home/alice/scan_JohnDoe.nii.gz token=abc"))
    body = json.loads(resp.body)["error"]
    assert resp.status_code == 500 and body["code"] == "internal_error" and body["request_id"] in body["hint"]
    assert "JohnDoe" not in resp.body.decode() and "RuntimeError" not in resp.body.decode()


def test_job_table_orphans_jobs_of_a_silent_owner():
    table = JobTable(lease_s=10)
    table.put({"job_id": "a", "status": "running", "owner": "g1"}, now=100.0)
    table.put({"job_id": "b", "status": "succeeded", "owner": "g1"}, now=100.0)
    assert table.get("a", now=105.0)["status"] == "running"
    table.heartbeat("g1", now=108.0)
    assert table.get("a", now=115.0)["status"] == "running"
    job = table.get("a", now=119.0)
    assert job["status"] == "failed" and job["error"]["code"] == CODE_JOB_ORPHANED and "owner" not in job
    assert table.get("b", now=500.0)["status"] == "succeeded"


# -- 10: jobs --------------------------------------------------------------------------------------------


def test_job_submit_checks_urls_and_admits_a_bounded_number(svc, vols, s3_env):
    import s3fs

    out = f"s3://{BUCKET}/out/x.nii.gz"
    for image in ("file:///etc/passwd", "/etc/passwd", "http://127.0.0.1:9/ct.nii.gz", "http://[::1]/ct.nii.gz"):
        resp = httpx.post(f"{svc}/v1/jobs", json={"image": image, "output_uri": out}, timeout=30)
        assert resp.status_code == 403, (image, resp.text[:300])
        assert _err(resp)["code"] == "url_not_allowed"
    s3fs.S3FileSystem(**s3_env).put(str(vols / "ct.nii.gz"), f"{BUCKET}/in/ct.nii.gz")
    body = {"image": f"s3://{BUCKET}/in/ct.nii.gz", "prompts": {"classes": ["liver"]}}
    responses = [httpx.post(f"{svc}/v1/jobs", json=body | {"output_uri": f"s3://{BUCKET}/out/{i}.nii.gz"},
                            timeout=30) for i in range(MAX_JOBS + 2)]
    statuses = [r.status_code for r in responses]
    assert statuses.count(202) >= MAX_JOBS and 503 in statuses, statuses
    for resp in responses:
        if resp.status_code == 503:
            assert _err(resp)["code"] == "overloaded" and int(resp.headers["retry-after"]) >= 1
    for resp in responses:
        if resp.status_code == 202:
            job_id = resp.json()["job_id"]
            deadline = time.monotonic() + 120
            while (job := httpx.get(f"{svc}/v1/jobs/{job_id}", timeout=30).json())["status"] in ("queued", "running"):
                assert time.monotonic() < deadline, job
                time.sleep(0.5)
            assert job["status"] == "succeeded", job


# -- 7: work after timeout -------------------------------------------------------------------------------


def test_timed_out_model_work_is_shed(svc, vols):
    with cf.ThreadPoolExecutor(2) as pool:
        slow = list(pool.map(lambda _: _upload(svc, vols / "slow.nii.gz", name="slow.nii.gz", output="json",
                                               timeout=60), range(2)))
    assert [r.status_code for r in slow] == [504, 504], [r.text[:200] for r in slow]
    # both model slots were busy with abandoned work before the fix: this one timed out as well
    resp = _upload(svc, vols / "ct.nii.gz", classes="liver", output="json")
    assert resp.status_code == 200, resp.text[:500]


# -- 8: model replica killed mid-request / 10: Gateway crash ------------------------------------------------


def _replica(deployment: str):
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::nvseg#{deployment}#")]
    assert names, ray.util.list_named_actors(all_namespaces=True)
    return ray.get_actor(names[0], namespace="serve")


def test_killed_model_replica_gives_503_without_internals(svc, vols):
    import ray

    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_upload, svc, vols / "slow.nii.gz", "slow.nii.gz", 60, output="json")
        time.sleep(2.5)  # upload, decode and preprocess take well under a second: the model is running
        ray.kill(_replica("Model"), no_restart=True)
        resp = pending.result()
    assert resp.status_code == 503, resp.text[:500]
    assert _err(resp)["code"] == "model_unavailable" and int(resp.headers["retry-after"]) >= 1
    wait_ready(svc)


def test_jobs_of_a_crashed_gateway_end_failed(svc, vols, s3_env):
    import ray
    import s3fs

    s3fs.S3FileSystem(**s3_env).put(str(vols / "slow.nii.gz"), f"{BUCKET}/in/slow.nii.gz")
    resp = httpx.post(f"{svc}/v1/jobs", timeout=30, json={"image": f"s3://{BUCKET}/in/slow.nii.gz",
                                                          "output_uri": f"s3://{BUCKET}/out/slow.nii.gz"})
    assert resp.status_code == 202, resp.text[:300]
    job_id = resp.json()["job_id"]
    time.sleep(1.0)
    ray.kill(_replica("Gateway"), no_restart=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            job = httpx.get(f"{svc}/v1/jobs/{job_id}", timeout=10).json()
            if job.get("status") not in ("queued", "running"):
                break
        except (httpx.HTTPError, ValueError):
            pass  # the Gateway restarting
        assert time.monotonic() < deadline, "the orphaned job never ended"
        time.sleep(1)
    assert job["status"] == "failed" and job["error"]["code"] == CODE_JOB_ORPHANED, job
