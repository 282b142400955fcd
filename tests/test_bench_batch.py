"""Smoke test of the batch throughput benchmark (benchmarks/bench_batch.py): 2 tiny volumes, tiny model, CPU.

Ray: when a Ray session already runs in this process (the session-scoped ``ray_cluster`` fixture of
tests/conftest.py, if an earlier test started it), the benchmark reuses it and leaves it running; otherwise it
starts a local Ray and shuts it down before returning. Either way this test leaves Ray as it found it. It does
not request ``ray_cluster`` itself, so it runs without the S3 stand-in.
"""

from __future__ import annotations

import json

from benchmarks.bench_batch import main


def test_bench_batch_smoke(tmp_path, capsys):
    import ray

    ray_was_running = ray.is_initialized()
    out = tmp_path / "bench.json"
    report = main(["--n", "2", "--scale", "1", "--shape", "24,24,12", "--spacing", "2,2,4", "--patch-size",
                   "32,32,32", "--classes", "liver,3", "--seq-threads", "1", "--workdir", str(tmp_path / "work"),
                   "--json", str(out), "--quiet"])
    printed = capsys.readouterr().out

    assert ray.is_initialized() == ray_was_running  # started and stopped here, or reused and left running
    data = json.loads(out.read_text())
    assert data["format"] == "nvseg-bench-batch/1"
    assert set(data["modes"]) == {"sequential", "ray"}
    runs = {r["mode"]: r for r in data["runs"]}
    assert runs["sequential"]["ok"] == 2 and runs["ray"]["ok"] == 2 and runs["ray"]["failed"] == 0
    for run in runs.values():
        assert run["volumes"] == 2 and run["wall_s"] > 0 and run["volumes_per_s"] > 0
        assert run["peak_rss_mb"] > 0 and run["samples"] > 0
        assert 0 < run["model_busy_fraction"]
    assert runs["ray"]["peak_processes"] > 1  # the Ray workers were counted, not only the driver
    assert runs["ray"]["trace"]["calls"] == {"preprocess": 2, "model": 2, "postprocess": 2}
    assert data["ratios"]["end_to_end"] > 0
    assert set(data["targets"]) == {"throughput ratio >= 1.3", "model busy >= 90% once warm", "peak memory flat in N"}
    assert data["targets"]["peak memory flat in N"]["pass"] is None  # --scale 1: not measured
    assert report["runs"] == data["runs"]
    for word in ("sequential", "ray (N=2)", "throughput ratio", "PASS" if "PASS" in printed else "FAIL"):
        assert word in printed
    # masks landed where the two modes write them
    work = tmp_path / "work"
    assert len(list((work / "out_seq").rglob("*_trans.nii.gz"))) == 2
    assert len(list((work / "out_ray_n").rglob("*_trans.nii.gz"))) == 2
