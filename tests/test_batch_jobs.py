"""The batch job as users launch it: `python jobs/batch_segment.py` (killed and resumed) and `ray job submit`.

These start their own Ray (a subprocess driver's local Ray; a `ray start --head` cluster), separate from
the in-process cluster of tests/test_batch.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from .helpers import stop_process_group
from .model_helpers import TEST_PATCH, body_phantom, save_volume

REPO = Path(__file__).resolve().parents[1]
RAY_BIN = Path(sys.executable).with_name("ray")
COMMON = ["--classes", "liver,spleen", "--patch-size", ",".join(map(str, TEST_PATCH)), "--device", "cpu",
          "--no-progress-bars", "--progress-interval-s", "2"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}, **extra)
    # as with an activated venv: the job's `python` entrypoint must be this interpreter
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _volumes(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    return [save_volume(root / f"case{i:02d}.nii.gz", body_phantom((44, 40, 24), seed=i),
                        np.diag([1.3, 1.3, 2.6, 1.0])) for i in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reports(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in out.rglob("*_trans.json")}


def test_killed_job_resumes_without_redoing_finished_volumes(tiny_checkpoint, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    _volumes(inputs, 6)
    cmd = [sys.executable, str(REPO / "jobs/batch_segment.py"), "--input", str(inputs), "--output", str(out),
           "--checkpoint", tiny_checkpoint, "--ray-address", "local", *COMMON]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(_reports(out)) < 2 and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, "the job finished before it could be killed"
        assert len(_reports(out)) >= 2
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a hard kill: driver, its local Ray and every worker
        proc.wait(timeout=60)

    finished = _reports(out)
    assert 2 <= len(finished) < 6
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or ".partial" in p.name], "temporary files left"
    for name in finished:  # every output that looks finished is complete and valid
        mask = next(out.rglob(name.replace(".json", ".nii.gz")))
        assert nib.load(str(mask)).get_fdata().shape == (44, 40, 24)

    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    after = _reports(out)
    assert len(after) == 6
    assert {k: after[k] for k in finished} == finished, "a finished volume was processed again"
    runs = sorted((out / "_nvseg_runs").iterdir(), key=lambda p: p.stat().st_mtime)
    manifest = pd.read_parquet(runs[-1] / "manifest.parquet")
    assert (manifest["status"] == "skipped").sum() == len(finished)
    assert (manifest["status"] == "ok").sum() == 6 - len(finished)
    assert "done (ok" in rerun.stdout  # the periodic one-line status


@contextlib.contextmanager
def start_ray_head(env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """A real `ray start --head --block` cluster with the job server on loopback, started with ``env`` (its
    workers' environment), in its own process group (stopped with killpg, so `ray stop` never touches the
    other test cluster). Yields the dashboard address and the cluster's temp dir (its session logs)."""
    import shutil
    import tempfile
    import urllib.request

    gcs, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    # every port explicit: the job agent's default listen port (52365) is taken when another Ray (the in-process
    # test cluster) runs on this machine, and the job server then answers "No available agent" forever
    start = [str(RAY_BIN), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
             f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
             f"--temp-dir={temp_dir}"]
    head = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or head.poll() is not None:
                    raise RuntimeError("ray start --head did not come up") from None
                time.sleep(1)
        yield address, temp_dir
    finally:
        stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit_job(address: str, env: dict[str, str], args: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- python jobs/batch_segment.py ARGS` (retried while the job agent
    registers, which comes after the dashboard answers on a busy machine)."""
    submit = [str(RAY_BIN), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
              "python", "jobs/batch_segment.py", *args]
    deadline = time.monotonic() + 300
    while True:
        done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(3)


@pytest.fixture
def ray_head():
    """:func:`start_ray_head` with this process's environment; yields (address, env)."""
    env = _env()
    with start_ray_head(env) as (address, _):
        yield address, env


def test_ray_job_submit_end_to_end(ray_head, tiny_checkpoint, tmp_path):
    address, env = ray_head
    inputs, out = tmp_path / "in", tmp_path / "out"
    _volumes(inputs, 3)
    done = submit_job(address, env, ["--input", str(inputs), "--output", str(out), "--checkpoint", tiny_checkpoint,
                                     *COMMON])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in done.stdout.lower()
    assert len(_reports(out)) == 3
    manifest = pd.read_parquet(next(out.glob("_nvseg_runs/*/manifest.parquet")))
    assert list(manifest["status"]) == ["ok"] * 3
