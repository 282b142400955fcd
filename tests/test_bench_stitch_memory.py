"""Smoke test of benchmarks/bench_stitch_memory.py at tiny sizes: every method runs in its own process, the
figures come back, and the slabs' peak stays flat where the whole-grid methods' grows."""

from __future__ import annotations

import json

from benchmarks.bench_stitch_memory import METHODS, main


def test_bench_stitch_memory_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--in-plane", "48,48", "--lengths", "20,160", "--patch-size", "32,32,16",
                 "--max-gb", "0.05", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["format"] == "nvseg-bench-stitch-memory/1" and "ratio largest/smallest peak" in printed
    for method in METHODS:
        assert set(data["results"][method]) == {"20", "160"}
    assert all(data["results"]["slabs"][d]["peak_rss_mb"] > 0 for d in ("20", "160"))
    # 117 x 48 x 48 x 160 x 4 bytes = 0.16 GB of upstream logits: over --max-gb, so skipped and said so
    assert data["results"]["upstream"]["160"] is None and "skipped" in printed
    assert data["flatness"]["slabs"] < 1.1
