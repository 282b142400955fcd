"""The batch run's browsable report (``report.html``, :mod:`nvseg_ray.batch.run_report`) and ``nvseg report``.

The HTML is checked as text (escaping, relative links, lower bounds, histogram, cost, thumbnails, older
manifests, 10,000 rows), the command through the real entry point, and the page itself in a real headless
Chromium driven by Selenium (filter, status select, "flagged only", sorting, loaded thumbnails, no console
errors, a screenshot). Without Chromium / chromedriver / selenium the browser test skips, saying what is missing;
``scripts/bootstrap.sh`` (as root) installs them.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

from nvseg_ray.batch import run_report  # noqa: E402
from nvseg_ray.batch.manifest import RUNS_DIR, write_manifest  # noqa: E402
from nvseg_ray.batch.run_report import (  # noqa: E402
    HISTOGRAM_BINS,
    REPORT_NAME,
    render_run_report,
    write_run_report,
)
from nvseg_ray.cli import main  # noqa: E402
from nvseg_ray.errors import EXIT_INVALID, EXIT_STORAGE, REASON_NOT_FOUND, StorageError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUN = "r1"
#: an error message a careless page would execute
EVIL = '<script>window.__pwned = 1</script> & "quoted" \'single\''


def _png(width: int = 8, height: int = 6) -> bytes:
    """A valid RGB PNG (a small gradient), written with zlib only."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes(v for x in range(width) for v in ((x * 30) % 256, (y * 40) % 256, 128))
                   for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _row(output: str, name: str, **values) -> dict:
    row = {
        "uri": f"/data/in/{name}.nii.gz", "rel_dir": "", "status": "ok", "error_code": "", "error_message": "",
        "output_uri": f"{output}/a/{name}_trans.nii.gz", "modality": "CT_BODY", "input_shape": [64, 64, 40],
        "input_voxels": 163840, "labelled_voxels": 1000, "n_labels": 12,
        "t_read": 0.5, "t_preprocess": 1.0, "t_infer": 2.0, "t_postprocess": 0.5, "t_write": 0.2, "t_seg": 0.0,
        "t_qc": 0.3, "t_total": 4.2,
        "report_uri": f"{output}/a/{name}_report.json", "preview_uri": f"{output}/a/{name}_preview.png",
        "qc_flags": "", "qc_reasons": "[]", "key_volumes": json.dumps([{"name": "liver", "ml": 1480.0,
                                                                        "cut_by_fov": False}]),
        "thumbnail": _png(), "model_node": "node-1", "preprocess_node": "node-2",
    }
    row.update(values)
    return row


def _frame(output: str):
    """Five volumes: ok + two flags, ok clean, ok + one flag, failed with markup in its message, skipped."""
    rows = [
        _row(output, "case1", t_total=12.0, qc_flags="cut_by_fov,volume_outlier",
             qc_reasons=json.dumps([
                 {"flag": "cut_by_fov", "reason": "liver touches the top of the field of view", "structures": ["liver"]},
                 {"flag": "volume_outlier", "reason": "spleen 3× the reference volume", "structures": ["spleen"]}]),
             key_volumes=json.dumps([{"name": "liver", "ml": 1520.4, "cut_by_fov": True},
                                     {"name": "spleen", "ml": 610.0, "cut_by_fov": False}])),
        _row(output, "case2", t_total=5.0),
        _row(output, "case3", t_total=30.0, qc_flags="few_labels",
             qc_reasons=json.dumps([{"flag": "few_labels", "reason": "only 2 labels", "structures": []}])),
        _row(output, "case4 <b>&", status="failed", error_code="invalid_input", error_message=EVIL, output_uri="",
             report_uri="", preview_uri="", key_volumes="[]", thumbnail=b"", t_read=0.4, t_preprocess=0.0,
             t_infer=0.0, t_postprocess=0.0, t_write=0.0, t_qc=0.0, t_total=0.4),
        _row(output, "case5", status="skipped", report_uri="", preview_uri="", key_volumes="[]", thumbnail=b"",
             t_read=0.0, t_preprocess=0.0, t_infer=0.0, t_postprocess=0.0, t_write=0.0, t_qc=0.0, t_total=0.0),
    ]
    return pd.DataFrame(rows)


def _summary(**extra) -> dict:
    summary = {"run": RUN, "manifest": "m", "total": 5, "ok": 3, "skipped": 1, "failed": 1, "wall_s": 3600.0,
               "volumes_per_s": 0.0008, "stage_seconds": {"t_read": 1.5, "t_infer": 6.0},
               "model_busy_fraction": 0.5, "errors": {"invalid_input": 1}, "nodes": 2, "cost_per_node_hour": None}
    summary.update(extra)
    return summary


def _write_run(tmp_path: Path, frame=None, summary=None) -> Path:
    output = tmp_path / "out"
    write_manifest(_frame(str(output)) if frame is None else frame, _summary() if summary is None else summary,
                   str(output), RUN)
    return output / RUNS_DIR / RUN


def _render(output: str = "/data/out", frame=None, **kwargs) -> str:
    kwargs.setdefault("run_dir", f"{output}/{RUNS_DIR}/{RUN}")
    summary = kwargs.pop("summary", _summary())
    return render_run_report(_frame(output) if frame is None else frame, summary, **kwargs)


# --------------------------------------------------------------------------------------------------------
# The HTML as text
# --------------------------------------------------------------------------------------------------------


def test_everything_is_escaped():
    page = _render()
    assert "window.__pwned" in page  # the message is shown ...
    assert "<script>window.__pwned" not in page and page.count("<script") == 1  # ... as text; one script: ours
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt; &amp; &quot;quoted&quot; &#x27;single&#x27;" in page
    assert "case4 &lt;b&gt;&amp;" in page and "case4 <b>" not in page
    assert 'data-uri="/data/in/case4 &lt;b&gt;&amp;.nii.gz"' in page


def test_links_are_relative_under_the_output_root_and_absolute_elsewhere():
    frame = _frame("/data/out")
    frame.loc[1, "output_uri"] = "/elsewhere/x y#1.nii.gz"
    page = _render(frame=frame)
    assert 'href="../../a/case1_trans.nii.gz"' in page
    assert 'href="../../a/case1_report.json"' in page and 'href="../../a/case1_preview.png"' in page
    assert 'href="file:///elsewhere/x%20y%231.nii.gz"' in page  # absolute, quoted
    s3 = _render("s3://bkt/out")
    assert 'href="../../a/case2_trans.nii.gz"' in s3
    frame = _frame("s3://bkt/out")
    frame.loc[0, "output_uri"] = "s3://other/out/a.nii.gz"
    frame.loc[1, "output_uri"] = "s3://bkt/outside/b.nii.gz"  # same bucket, not under the output root
    page = _render("s3://bkt/out", frame=frame)
    assert 'href="s3://other/out/a.nii.gz"' in page and 'href="s3://bkt/outside/b.nii.gz"' in page
    # a file:// run folder and plain-path artefacts are one filesystem
    assert 'href="../../a/case2_trans.nii.gz"' in _render(frame=_frame("/data/out"),
                                                          run_dir=f"file:///data/out/{RUNS_DIR}/{RUN}")


def test_structures_cut_by_the_field_of_view_are_lower_bounds():
    page = _render()
    assert re.search(r'<li class="lower-bound"[^>]*>liver ≥ 1520 ml</li>', page)
    assert "<li>spleen 610 ml</li>" in page and "<li>liver 1480 ml</li>" in page


def test_flags_carry_their_reasons():
    page = _render()
    assert 'title="liver touches the top of the field of view (liver)"' in page
    assert "<li><b>volume_outlier</b>: spleen 3× the reference volume (spleen)</li>" in page
    assert 'data-flags="cut_by_fov,volume_outlier"' in page and 'data-flags=""' in page
    assert re.search(r'id="flag-counts">.*cut_by_fov.*<td class="num">1</td>', page, flags=re.S)
    assert "(2 volume(s) flagged)" in page


def test_summary_histogram_and_counts():
    page = _render()
    assert '<svg id="histogram"' in page
    assert page.count('class="hbar"') == HISTOGRAM_BINS
    assert "3 volume(s): median 12.00 s" in page  # the ok rows only: 5, 12, 30
    assert '<b id="count-ok">3</b>' in page and '<b id="count-failed">1</b>' in page
    assert re.search(r'id="error-counts">\s*<tr><td><code>invalid_input</code></td><td class="num">1</td>', page)
    assert 'id="stage-seconds"' in page and "1 of 5" not in page and "5 of 5 shown" in page


def test_cost_per_volume():
    assert 'id="cost"' not in _render()  # no rate anywhere: no cost line
    page = _render(summary=_summary(cost_per_node_hour=1.5))  # 1 h x 2 nodes x 1.5 / 3 ok = 1
    assert re.search(r'id="cost">1 per volume \(3 for the run', page)
    page = _render(summary=_summary(cost_per_node_hour=1.5), cost_per_node_hour=3.0)  # the argument wins
    assert re.search(r'id="cost">2 per volume \(6 for the run', page)
    page = _render(summary=_summary(nodes=None, ok=0), cost_per_node_hour=3.0)
    assert re.search(r'id="cost">3 per volume .*1 assumed', page)  # max(ok, 1); an unknown node count is 1


def test_thumbnails_are_embedded_up_to_the_cap(monkeypatch):
    page = _render()
    assert page.count('src="data:image/png;base64,') == 3
    monkeypatch.setattr(run_report, "MAX_EMBEDDED_THUMBNAILS", 1)
    page = _render()
    assert page.count('src="data:image/png;base64,') == 1
    assert page.count('class="preview-link" href="../../a/case') == 2  # beyond the cap: a link to the preview


def test_the_page_fetches_nothing():
    page = _render()
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'\ssrc="([^"]*)"', page))
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert "default-src 'none'" in page  # the page's own CSP forbids any fetch


def test_an_older_manifest_renders_with_blanks():
    frame = pd.DataFrame([{"uri": "/in/a.nii.gz", "status": "ok", "error_code": "", "error_message": "",
                           "output_uri": "/data/out/a.nii.gz", "t_read": 1.0, "t_infer": 2.0},
                          {"uri": "/in/b.nii.gz", "status": "failed", "error_code": "x", "error_message": None,
                           "output_uri": None, "t_read": float("nan"), "t_infer": None}])
    page = _render(frame=frame, summary={})
    assert page.count('<tr class="volume"') == 2 and 'href="../../a.nii.gz"' in page
    assert '<b id="count-ok">1</b>' in page and "3.00" in page  # t_total derived from the stages present
    assert _render(frame=frame.iloc[0:0], summary={}).count('<tr class="volume"') == 0


def test_ten_thousand_rows():
    one = _row("/data/out", "x")
    rows = [dict(one, uri=f"/in/{i:05d}.nii.gz", t_total=1.0 + i % 97, thumbnail=b"") for i in range(10_000)]
    started = time.monotonic()
    page = _render(frame=pd.DataFrame(rows))
    assert time.monotonic() - started < 30
    assert page.count('<tr class="volume"') == 10_000
    assert len(page) < 40_000_000


# --------------------------------------------------------------------------------------------------------
# Reading the run folder, errors, the command
# --------------------------------------------------------------------------------------------------------


def test_write_run_report_reads_the_run_folder(tmp_path):
    run_dir = _write_run(tmp_path, summary=_summary(cost_per_node_hour=1.5))
    uri = write_run_report(str(run_dir))
    assert uri == str(run_dir / REPORT_NAME)
    page = Path(uri).read_text(encoding="utf-8")
    assert "<h1>nvseg run r1</h1>" in page and 'id="cost">1 per volume' in page
    assert page.count('src="data:image/png;base64,') == 3  # the bytes column survived Parquet
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # atomic: no temp file left
    (run_dir / "summary.json").unlink()  # no summary: the counts come from the manifest
    assert '<b id="count-failed">1</b>' in Path(write_run_report(str(run_dir))).read_text(encoding="utf-8")


def test_a_run_folder_on_s3(s3_env, s3_bucket, capsys):
    from nvseg_ray.io import read_bytes

    output = f"s3://{s3_bucket}/out"
    write_manifest(_frame(output), _summary(), output, RUN)
    run_dir = f"{output}/{RUNS_DIR}/{RUN}"
    assert main(["report", run_dir]) == 0  # credentials and endpoint from the environment
    assert capsys.readouterr().out.strip() == f"{run_dir}/{REPORT_NAME}"
    page = read_bytes(f"{run_dir}/{REPORT_NAME}").decode("utf-8")
    assert 'href="../../a/case1_trans.nii.gz"' in page and page.count('src="data:image/png;base64,') == 3
    assert write_run_report(run_dir, s3_env, cost_per_node_hour=3.0) == f"{run_dir}/{REPORT_NAME}"
    assert 'id="cost">2 per volume' in read_bytes(f"{run_dir}/{REPORT_NAME}", s3_env).decode("utf-8")
    with pytest.raises(StorageError) as err:
        write_run_report(f"{output}/{RUNS_DIR}/nope", s3_env)
    assert err.value.details["reason"] == REASON_NOT_FOUND and "no run folder" in err.value.message


def test_missing_run_folder_or_manifest_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError) as err:
        write_run_report(str(tmp_path / "nope"))
    assert err.value.details["reason"] == REASON_NOT_FOUND and "no run folder" in err.value.message
    assert err.value.hint and "_nvseg_runs" in err.value.hint and err.value.exit_code == EXIT_STORAGE
    with pytest.raises(StorageError, match="no run manifest manifest.parquet"):
        write_run_report(str(tmp_path))
    (tmp_path / "manifest.parquet").write_bytes(b"not parquet")
    with pytest.raises(StorageError) as err:
        write_run_report(str(tmp_path))
    assert err.value.code == "invalid_manifest"


def test_nvseg_report_command(tmp_path, capsys):
    run_dir = _write_run(tmp_path)
    assert main(["report", str(run_dir), "--cost-per-node-hour", "3"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(run_dir / REPORT_NAME)
    assert 'id="cost">2 per volume' in Path(out).read_text(encoding="utf-8")
    assert main(["report", str(run_dir), "--cost-per-node-hour", "-1"]) == EXIT_INVALID
    assert capsys.readouterr().err.startswith("nvseg report: [invalid_config]")


def test_nvseg_report_errors_through_the_entry_point(tmp_path):
    done = subprocess.run([sys.executable, "-m", "nvseg_ray", "report", str(tmp_path / "missing")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_STORAGE, done.stderr
    assert done.stderr.startswith("nvseg report: [storage_error] cannot build the run report: no run folder")
    assert "hint:" in done.stderr and "Traceback" not in done.stderr and not done.stdout


# --------------------------------------------------------------------------------------------------------
# A real browser: headless Chromium through Selenium and the Debian chromedriver
# --------------------------------------------------------------------------------------------------------

_BROWSERS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
_SETUP = "scripts/bootstrap.sh installs them (run it as root: apt-get install chromium chromium-driver)"


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip(f"the Python package selenium is not installed (the test extra; {_SETUP})")
    binary = next((b for b in (shutil.which("chromium"), *_BROWSERS) if b and Path(b).exists()), None)
    driver_path = next((d for d in (shutil.which("chromedriver"), "/usr/bin/chromedriver") if d and Path(d).exists()),
                       None)
    missing = [what for what, found in (("chromium", binary), ("chromedriver (chromium-driver)", driver_path))
               if not found]
    if missing:
        pytest.skip(f"browser test needs {' and '.join(missing)}, not found; {_SETUP}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:  # an explicit driver path: Selenium Manager (which would go to the network) is not consulted
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    except Exception as exc:  # a driver / browser version mismatch, a broken install
        pytest.skip(f"could not start headless chromium ({binary}) with {driver_path}: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}; {_SETUP}")
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


_VISIBLE = ("return Array.from(document.querySelectorAll('tr.volume'))"
            ".filter(function (r) { return r.offsetParent !== null; })"
            ".map(function (r) { return r.getAttribute('data-uri'); });")


def _stem(uri: str) -> str:
    return uri.rsplit("/", 1)[-1].split(".nii", 1)[0]


def test_report_in_a_real_browser(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    run_dir = _write_run(tmp_path)
    uri = Path(write_run_report(str(run_dir)))
    browser.get(uri.resolve().as_uri())
    wait = WebDriverWait(browser, 5)

    def visible() -> list[str]:
        return [_stem(u) for u in browser.execute_script(_VISIBLE)]

    def shown_becomes(expected: list[str]) -> None:
        wait.until(lambda _d: sorted(visible()) == sorted(expected), message=f"visible rows never became {expected}")

    everything = ["case1", "case2", "case3", "case4 <b>&", "case5"]
    assert visible() == everything
    assert len([r for r in browser.find_elements(By.CSS_SELECTOR, "tr.volume") if r.is_displayed()]) == 5
    assert browser.execute_script("return window.__pwned") is None  # the error message stayed text
    failed = browser.find_element(By.CSS_SELECTOR, 'tr.volume[data-status="failed"] td.error').text
    assert "<script>window.__pwned = 1</script>" in failed

    # the links resolve, from the report's folder, to the artefacts under the output root
    output = run_dir.parent.parent
    links = {a.get_attribute("class"): a.get_property("href")
             for a in browser.find_elements(By.CSS_SELECTOR, 'tr.volume[data-flags="few_labels"] td.links a')}
    assert links == {"link-mask": (output / "a" / "case3_trans.nii.gz").as_uri(),
                     "link-report": (output / "a" / "case3_report.json").as_uri(),
                     "link-preview": (output / "a" / "case3_preview.png").as_uri()}

    # thumbnails are decoded images
    images = browser.execute_script(
        "return Array.from(document.querySelectorAll('img.thumb')).map(function (i) {"
        " return [i.complete, i.naturalWidth, i.naturalHeight]; });")
    assert images == [[True, 8, 6]] * 3

    # the text filter, the status select, "flagged only"
    box = browser.find_element(By.ID, "filter")
    box.send_keys("case2")
    shown_becomes(["case2"])
    assert browser.find_element(By.ID, "shown-count").text == "1 of 5 shown"
    box.clear()
    box.send_keys("invalid_input")  # the error code
    shown_becomes(["case4 <b>&"])
    box.clear()
    box.send_keys("volume_outlier")  # a flag code
    shown_becomes(["case1"])
    box.clear()
    browser.execute_script("arguments[0].dispatchEvent(new Event('input'))", box)
    shown_becomes(everything)
    browser.find_element(By.ID, "flagged-only").click()
    shown_becomes(["case1", "case3"])
    Select(browser.find_element(By.ID, "status-filter")).select_by_value("failed")
    shown_becomes([])
    browser.find_element(By.ID, "flagged-only").click()
    shown_becomes(["case4 <b>&"])
    Select(browser.find_element(By.ID, "status-filter")).select_by_value("")
    shown_becomes(everything)

    # the reasons of a flag expand; its tooltip names them
    chip = browser.find_element(By.CSS_SELECTOR, 'tr.volume[data-flags="few_labels"] span.flag')
    assert chip.get_attribute("title") == "only 2 labels"
    browser.find_element(By.CSS_SELECTOR, 'tr.volume[data-flags="few_labels"] details summary').click()
    assert browser.find_element(By.CSS_SELECTOR, 'tr.volume[data-flags="few_labels"] details li').is_displayed()

    # sorting: numerically (5 < 12 < 30, where text order would put "5" last), then descending, then by text
    total = browser.find_element(By.XPATH, "//th[normalize-space(text())='total s']")
    total.click()
    assert visible() == ["case5", "case4 <b>&", "case2", "case1", "case3"]
    assert "asc" in total.get_attribute("class")
    total.click()
    assert visible() == ["case3", "case1", "case2", "case4 <b>&", "case5"]
    browser.find_element(By.XPATH, "//th[normalize-space(text())='status']").click()
    assert visible()[0] == "case4 <b>&" and visible()[-1] == "case5"  # failed < ok < skipped
    box.send_keys("case")  # sorting keeps the filter's verdicts
    shown_becomes(everything)

    # the histogram is drawn
    bars = browser.find_elements(By.CSS_SELECTOR, "#histogram rect.hbar")
    assert len(bars) == HISTOGRAM_BINS and any(float(b.get_attribute("height")) > 0 for b in bars)

    try:
        logs = browser.get_log("browser")
    except Exception:  # a driver without the log endpoint: nothing to check
        logs = []
    errors = [entry for entry in logs if entry.get("level") == "SEVERE"]
    assert not errors, errors

    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    assert shot.exists() and shot.stat().st_size > 0
