"""The batch job on a real multi-node Ray cluster on one machine (issue #7, item 4).

Three `ray start --block` processes, each in its own process group, form one cluster, laid out like the
KubeRay manifests in cluster/ (see cluster/README.md, "Placement"):

* head: 0 CPUs (drivers, the job server and 0-CPU bookkeeping actors only, as `num-cpus: "0"` in KubeRay);
* worker "model": advertises the model-node resource (`nvseg_model_node`, the GPU group's resource);
* worker "cpu": advertises the CPU-node resource (`nvseg_cpu_node`, the CPU group's resource).

The job goes in through `ray job submit`, as on a cluster. One test asserts from the run manifest where each
stage ran; the other adds a second CPU node mid-job, SIGKILLs the first one's whole process group (raylet,
object store, workers) and asserts that the job still succeeds with every output present and valid.
Both together take ~2.5 min on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from .helpers import stop_process_group
from .model_helpers import TEST_PATCH, body_phantom, save_volume

REPO = Path(__file__).resolve().parents[1]
RAY_BIN = Path(sys.executable).with_name("ray")
MODEL_RESOURCE = "nvseg_model_node"  # the names cluster/base/raycluster.yaml gives the worker groups
CPU_RESOURCE = "nvseg_cpu_node"
SHAPE = (44, 40, 24)
COMMON = ["--classes", "liver,spleen", "--patch-size", ",".join(map(str, TEST_PATCH)), "--device", "cpu",
          "--no-progress-bars", "--progress-interval-s", "2", "--stage-memory-gb", "0.25",
          "--model-cpus", "1", "--model-gpus", "0", "--model-node-resource", MODEL_RESOURCE]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                # notice a dead node within a few seconds instead of ~30 s (GCS health checks of raylets)
                "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                "RAY_health_check_failure_threshold": "3",
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # teardown: stop nodes at once, no 30 s drain
                # a worker node's raylet registers within Ray's default 10 s on an idle machine, but not always on
                # 2 cores busy with the rest of the suite ("The current node timed out during startup")
                "RAY_raylet_start_wait_time_s": "60"})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the job's `python`
    return env


def _node_ports() -> list[str]:
    """Every port a node opens, explicit and free: several nodes (and the session's other Ray) share this host."""
    return [f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
            "--min-worker-port=0", "--max-worker-port=0",  # 0: the OS picks, so nodes never hand out one port twice
            f"--object-store-memory={300 * 2**20}", "--disable-usage-stats"]


@dataclass
class Cluster:
    address: str  # job server (dashboard) URL
    gcs: str  # host:port worker nodes join
    env: dict[str, str]
    logs: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    node_ids: dict[str, str] = field(default_factory=dict)  # role -> Ray node id

    def add_worker(self, role: str, resource: str, num_cpus: int = 2) -> str:
        """Start a worker node advertising ``{resource: 1}``; returns its node id once it is alive.

        One at a time: workers share the head's session folder and name their sockets after the ones already
        there (two starting at once can pick the same name, and one then never registers)."""
        known = {n["node_id"] for n in self.alive_nodes()}
        self.procs[role] = _start([str(RAY_BIN), "start", "--block", f"--address={self.gcs}", f"--num-cpus={num_cpus}",
                                   f"--resources={json.dumps({resource: 1})}", *_node_ports()], self.env,
                                  self.logs / f"{role}.log")
        def joined() -> list[str]:
            return [n["node_id"] for n in self.alive_nodes() if n["node_id"] not in known]

        _wait(lambda: len(joined()) == 1, self.procs[role], f"node {role}", self.logs)
        self.node_ids[role] = joined()[0]
        return self.node_ids[role]

    def kill(self, role: str) -> None:
        """SIGKILL a node's whole process group: its raylet, object store, agents and every worker on it."""
        proc = self.procs[role]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def alive_nodes(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.address}/api/v0/nodes?limit=100", timeout=10) as r:
            rows = json.load(r)["data"]["result"]["result"]
        return [n for n in rows if n["state"] == "ALIVE"]


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    env = _env()
    gcs, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: unix socket paths are length-limited
    logs = tmp_path_factory.mktemp("ray-start-logs")
    c = Cluster(address=f"http://127.0.0.1:{dash}", gcs=f"127.0.0.1:{gcs}", env=env, logs=logs)
    try:
        c.procs["head"] = _start([str(RAY_BIN), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=0",
                                  "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                  f"--dashboard-port={dash}", f"--ray-client-server-port={_free_port()}",
                                  f"--temp-dir={temp_dir}", *_node_ports()], env, logs / "head.log")
        _wait(lambda: _answers(f"{c.address}/api/version") and len(c.alive_nodes()) == 1, c.procs["head"], "head",
              logs)
        c.node_ids["head"] = c.alive_nodes()[0]["node_id"]
        c.add_worker("model", MODEL_RESOURCE)
        c.add_worker("cpu", CPU_RESOURCE)
        yield c
    finally:
        for proc in reversed(list(c.procs.values())):  # workers first, then the head
            stop_process_group(proc, timeout_s=20)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except (OSError, KeyError, ValueError):
        return False


def _wait(ready, proc: subprocess.Popen, what: str, logs: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except (OSError, KeyError, ValueError):
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            tail = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(logs.glob("*.log")))
            raise RuntimeError(f"Ray cluster: no {what} in time\n{tail}")
        time.sleep(1)


def _volumes(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    return [save_volume(root / f"case{i:02d}.nii.gz", body_phantom(SHAPE, seed=i), np.diag([1.3, 1.3, 2.6, 1.0]))
            for i in range(n)]


def _submit_cmd(c: Cluster, inputs: Path, out: Path, checkpoint: str, *extra: str) -> list[str]:
    return [str(RAY_BIN), "job", "submit", "--address", c.address, "--working-dir", str(REPO), "--",
            "python", "jobs/batch_segment.py", "--input", str(inputs), "--output", str(out),
            "--checkpoint", checkpoint, *COMMON, *extra]


def _submit(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    deadline = time.monotonic() + 240  # the job agent registers a little after the dashboard answers
    while True:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(3)


def _manifest(out: Path) -> pd.DataFrame:
    return pd.read_parquet(next(out.glob("_nvseg_runs/*/manifest.parquet")))


def _assert_outputs_valid(out: Path, inputs: list[Path], manifest: pd.DataFrame) -> None:
    """One ok row per input, and each output mask + report complete and readable."""
    assert sorted(manifest["uri"].map(lambda u: Path(u).name)) == sorted(p.name for p in inputs)
    assert list(manifest["status"]) == ["ok"] * len(inputs), manifest[["uri", "status", "error_message"]]
    for uri in manifest["output_uri"]:
        mask = nib.load(uri)
        assert mask.shape == SHAPE
        assert np.asarray(mask.dataobj).dtype == np.uint16
        assert Path(uri.replace(".nii.gz", ".json")).is_file()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or ".partial" in p.name], "temporary files left"


def test_stages_run_on_the_nodes_their_resources_name(cluster, tiny_checkpoint, tmp_path):
    inputs, out = _volumes(tmp_path / "in", 4), tmp_path / "out"
    done = _submit(_submit_cmd(cluster, tmp_path / "in", out, tiny_checkpoint, "--cpu-node-resource", CPU_RESOURCE),
                   cluster.env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in done.stdout.lower()
    manifest = _manifest(out)
    _assert_outputs_valid(out, inputs, manifest)
    ids = cluster.node_ids
    assert set(manifest["model_node"]) == {ids["model"]}, "model work left the model node"
    assert set(manifest["preprocess_node"]) == {ids["cpu"]}, "preprocessing ran off the CPU node"
    assert set(manifest["postprocess_node"]) == {ids["cpu"]}, "writing ran off the CPU node"


def test_job_survives_losing_a_worker_node(cluster, tiny_checkpoint, tmp_path):
    """The CPU node dies mid-job with work in flight; another CPU node carries on and nothing is lost.

    Until the first outputs exist the "cpu" node is the only one advertising the CPU-node resource, so every
    read/preprocess/write so far ran there and the volumes in flight (tasks, and preprocessed blocks waiting
    for the model in its object store) are on it. A second CPU node then joins and the first is SIGKILLed.
    Ray retries the lost tasks and rebuilds the lost blocks from lineage on the survivor.
    """
    n = 12
    inputs, out = _volumes(tmp_path / "in", n), tmp_path / "out"
    cmd = _submit_cmd(cluster, tmp_path / "in", out, tiny_checkpoint, "--cpu-node-resource", CPU_RESOURCE,
                      "--run-name", "node-kill")
    job = subprocess.Popen(cmd, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None and not list(out.rglob("*_trans.json")):
            time.sleep(0.2)
        assert job.poll() is None, "the job ended before the node could be killed:\n" + job.stdout.read()[-4000:]
        cluster.add_worker("cpu2", CPU_RESOURCE)
        written_before = len(list(out.rglob("*_trans.json")))
        assert job.poll() is None and written_before < n, "the job finished before the node could be killed"
        cluster.kill("cpu")
        log, _ = job.communicate(timeout=420)
        (tmp_path / "job.log").write_text(log)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, log[-6000:]
    assert "succeeded" in log.lower()
    manifest = _manifest(out)
    _assert_outputs_valid(out, inputs, manifest)  # every input: one row, ok, mask and report valid
    ids = cluster.node_ids
    assert ids["cpu"] not in {node["node_id"] for node in cluster.alive_nodes()}, "the node was not killed"
    assert set(manifest["model_node"]) == {ids["model"]}
    written = set(manifest["postprocess_node"])
    assert ids["cpu"] in written, "no output was written on the killed node before it died"
    assert ids["cpu2"] in written, "no output was written by the surviving CPU node"
    assert written <= {ids["cpu"], ids["cpu2"]}
    # and work in flight on it was really lost and redone (Ray's messages in the job's log)
    assert "lost objects" in log or "node it was running on is dead" in log, "nothing was in flight on the node"
