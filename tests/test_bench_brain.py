"""Smoke test of the brain workflow benchmark (benchmarks/bench_brain.py): one head, 2 mm template, tiny model."""

from __future__ import annotations

import json

from benchmarks.bench_brain import main


def test_bench_brain_smoke(tmp_path, capsys, template_paths):
    out = tmp_path / "bench.json"
    assert main(["--n", "1", "--brain-template", template_paths[0], "--brain-template-mask", template_paths[1],
                 "--classes", "214,345", "--patch-size", "64,64,64", "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "seconds per stage per scan" in printed and "skullstrip" in printed
    (row,) = json.loads(out.read_text())["rows"]
    assert row["residual_mm"] < 2.0 and row["correlation"] > 0.9
    assert all(row[stage] > 0 for stage in ("brain_skullstrip", "brain_register", "infer", "brain_revert"))
