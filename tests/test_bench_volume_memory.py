"""Smoke test of benchmarks/bench_volume_memory.py at tiny sizes: both sides segment a real file in their own
process, the figures come back, upstream is skipped (and says so) where its logits would not fit."""

from __future__ import annotations

import json

from benchmarks.bench_volume_memory import main


def test_bench_volume_memory_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # 117 x (64*0.75/1.5)^2 x 60 x 4 bytes = 0.03 GB of upstream logits at 60 slices: over --max-gb 0.02
    assert main(["--in-plane", "64,64", "--lengths", "20,60", "--patch-size", "32,32,16", "--max-gb", "0.02",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["format"] == "nvseg-bench-volume-memory/1" and "flatness" in printed
    assert set(data["results"]["ours"]) == {"20", "60"}
    for figures in data["results"]["ours"].values():
        assert figures["peak_rss_mb"] > 0 and figures["shape"][:2] == [64, 64] and figures["foreground_voxels"] > 0
    assert data["results"]["upstream"]["20"]["shape"] == [64, 64, 20]
    assert data["results"]["upstream"]["60"] is None and "skipped" in printed
    assert data["upstream_over_ours"]["20"] > 0
