"""Smoke test of the DICOM benchmark (benchmarks/bench_dicom.py) at tiny sizes: 40 instances of 64 x 64 on a moto
S3 server the script starts and stops, a 64 x 64 x 20 series assembled by us and by dcm2niix, a 5-class SEG."""

from __future__ import annotations

import json
import threading

import pytest

from benchmarks.bench_dicom import find_dcm2niix, main, synthetic_label_map


def test_bench_dicom_smoke(tmp_path, capsys):
    pytest.importorskip("moto.server", reason='moto[server] is needed: pip install "nvseg-ray[test]"')
    pytest.importorskip("highdicom", reason='the dicom extra is needed: pip install "nvseg-ray[dicom]"')
    threads_before = {t.ident for t in threading.enumerate()}
    out = tmp_path / "bench.json"
    rc = main(["--discover-instances", "40", "--discover-series", "2", "--discover-matrix", "64",
               "--shape", "64,64,20", "--spacing", "0.8,0.8,2", "--seg-classes", "5",
               "--workdir", str(tmp_path / "work"), "--json", str(out), "--quiet"])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["format"] == "nvseg-bench-dicom/1"

    d = data["discover"]
    assert d["instances"] == 40 and d["agree"]
    for side in ("ours", "naive"):
        assert d[side]["seconds"] > 0 and d[side]["n_requests"] >= 40 and d[side]["bytes_downloaded"] > 0
    assert d["ratio_seconds"] > 0 and d["ratio_bytes"] > 0
    # the moto server thread was stopped
    assert not [t for t in threading.enumerate() if t.ident not in threads_before and t.is_alive() and
                "moto" in repr(getattr(t, "_target", "")).lower()]

    a = data["assemble"]
    assert a["instances"] == 20 and a["ours"]["seconds"] > 0
    assert 0 < a["ours"]["peak_rss_mb"] < 2000 and a["ours"]["peak_rss_above_baseline_mb"] >= 0
    if find_dcm2niix(None) is None:
        assert a["dcm2niix"] is None and "dcm2niix not found" in printed
    else:
        assert a["dcm2niix"]["returncode"] == 0 and a["dcm2niix"]["peak_rss_mb"] > 0
        assert a["agreement"]["ok"], a["agreement"]
        assert a["agreement"]["affine_max_diff"] <= 1e-3 and a["agreement"]["voxels_equal"]
        assert "agreement after as_closest_canonical: PASS" in printed
        assert rc == 0

    s = data["seg"]
    assert s["grid"] == [64, 64, 20] and s["classes"] == 5
    assert set(s["types"]) == {"labelmap", "binary"}
    for r in s["types"].values():
        assert r["seconds"] > 0 and r["bytes"] > 0 and r["frames"] > 0 and r["segments"] >= 5
    assert s["types"]["labelmap"]["frames"] == 20  # one frame per slice
    assert s["ratio_bytes"] > 0 and s["ratio_seconds"] > 0
    for heading in ("1. discover 40 instances", "2. assemble 64x64x20", "3. SEG of 5 classes",
                    "ratio naive/ours", "ratio dcm2niix/ours", "ratio binary/labelmap"):
        assert heading in printed or (heading == "ratio dcm2niix/ours" and a["dcm2niix"] is None)


def test_synthetic_label_map_has_every_class():
    import numpy as np

    ids = [1, 3, 5, 127, 200]
    labels = synthetic_label_map((40, 36, 12), ids, seed=1)
    assert labels.shape == (40, 36, 12) and labels.dtype == np.uint16
    assert set(np.unique(labels).tolist()) == {0, *ids}
    assert labels[0, 0, 0] == 0  # air outside the body
