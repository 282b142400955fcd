"""Smoke test of the HTTP service latency benchmark (benchmarks/bench_serve.py): tiny volume, tiny model, CPU.

The benchmark starts (and shuts down) its own local Ray and Serve, so it runs in a subprocess with
``RAY_ADDRESS=local``: it never touches the session's ``ray_cluster`` nor a Serve app another test runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_serve_smoke(tmp_path):
    pytest.importorskip("ray.serve")
    out = tmp_path / "bench_serve.json"
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_serve.py"), "--size", "32", "--patch-size", "32,32,32",
           "--requests", "2", "--concurrency", "1,2", "--warmup", "1", "--breakdown", "1", "--quiet",
           "--workdir", str(tmp_path / "work"), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())

    assert {"direct", "http"} <= set(report["paths"])
    by = {(r["path"], r["concurrency"]): r for r in report["results"]}
    for path in ("direct", "http"):
        for c in (1, 2):
            r = by[(path, c)]
            assert r["ok"] == r["requests"] == 2 and r["errors"] == 0, r
            assert 0 < r["p50_ms"] <= r["p95_ms"] and r["rps"] > 0, r
    assert by[("upload", 1)]["ok"] == 2  # the upload route is measured at C=1 by default
    ov = report["overhead"]
    assert ov["labels_equal"] is True  # the service's mask is the engine's
    assert ov["ratio"] > 0 and isinstance(ov["pass"], bool) and ov["target_percent"] == 15.0
    assert {c["component"] for c in report["breakdown"]["components"]} >= {"fetch image over HTTP", "preprocess"}
    assert report["input"]["shape"] == [32, 32, 32]

    printed = proc.stdout
    assert "HTTP /v1/vista3d/inference" in printed and "direct segment()" in printed
    assert "PASS" in printed or "FAIL" in printed
