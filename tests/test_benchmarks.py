"""Smoke test of the per-stage benchmark (benchmarks/bench_stages.py) on a tiny volume, tiny model, CPU."""

from __future__ import annotations

import json

from benchmarks.bench_stages import STAGES, main


def test_bench_stages_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--shape", "48,48,24", "--patch-size", "48,48,32", "--classes", "1,3", "--device", "cpu",
          "--no-warmup", "--json", str(out), "--quiet"])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())

    assert report["stages"] == list(STAGES)
    for side in ("ours", "upstream"):
        for key in ("seconds", "peak_extra_mb", "peak_rss_mb"):
            assert set(report[side][key]) == set(STAGES), (side, key)
            assert all(v >= 0 for v in report[side][key].values()), (side, key)
        assert report[side]["process_peak_rss_mb"] > 0
        assert report[side]["output"]["bytes"] > 0
    assert set(report["ratio"]) == {*STAGES, "total"}
    assert report["settings"]["n_prompts"] == 2
    assert report["model"]["synthetic"] and report["input"]["synthetic"]
    assert report["agreement"]["equal_fraction"] > 0.99  # same chain up to seam/tie rounding
    for stage in STAGES:
        assert stage in printed
    assert "label agreement" in printed


def test_bench_quality_smoke(tmp_path, capsys):
    from benchmarks.bench_quality import CPU_STAGES, QC_STEPS
    from benchmarks.bench_quality import main as quality_main

    report = quality_main(["--shape", "80,70,40", "--spacing", "4,4,6", "--blobs", "5", "--json",
                           str(tmp_path / "q.json"), "--quiet"])
    assert set(report["qc"]) == set(QC_STEPS) and set(report["cpu_stages"]) == set(CPU_STAGES)
    assert report["qc_cpu_s"] > 0 and report["cpu_stages_cpu_s"] > 0 and report["ratio"] > 0
    assert report["preview_bytes"] > report["thumbnail_bytes"] > 0
    assert "ratio QC / CPU stages" in capsys.readouterr().out
