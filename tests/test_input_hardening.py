"""Hostile inputs (issue 11: items 2, 5, 8, 9, 11, 13): each is refused up front with a typed error, bounded memory,
and the CLI goes on with the other volumes of a run."""

from __future__ import annotations

import gzip
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pytest
import torch

from nvseg_ray import io as nio
from nvseg_ray import validation as val
from nvseg_ray.config import InferenceConfig
from nvseg_ray.errors import CheckpointError, ConfigError, InputError, NvsegError, PromptError
from nvseg_ray.inference import MAX_SLIDING_WINDOWS, check_window_count, sliding_window_count
from nvseg_ray.labels import LabelCatalog, parse_class_list
from nvseg_ray.model import build_network
from nvseg_ray.output import earlier_claims, mask_uri
from nvseg_ray.preprocess import check_model_grid, resampled_shape
from nvseg_ray.upstream import upstream_model_grid_chain
from nvseg_ray.stages import VolumeStages

from .model_helpers import TEST_PATCH, body_phantom, make_tiny_state_dict, save_volume

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def _nifti(shape: tuple[int, ...] = (48, 48, 48), spacing: float = 1.0, data: np.ndarray | None = None) -> bytes:
    """Uncompressed single-file NIfTI-1 bytes of a CT-like int16 volume (48^3: 221 KB)."""
    values = body_phantom(shape) if data is None else data
    return nib.Nifti1Image(values, np.diag([spacing, spacing, spacing, 1.0])).to_bytes()


def _declaring(shape: tuple[int, int, int]) -> bytes:
    """A valid 4^3 file whose header claims ``shape`` (the data is missing)."""
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    raw = bytearray(img.to_bytes())
    header = img.header.copy()
    header.set_data_shape(shape)
    raw[:348] = header.binaryblock
    return bytes(raw)


def _gz(raw: bytes) -> bytes:
    return gzip.compress(raw, compresslevel=1, mtime=0)


# --------------------------------------------------------------------------------------------------------------
# Item 5: bounded decompression
# --------------------------------------------------------------------------------------------------------------

# (id, file bytes, expected InputError code or None for accepted). The bombs compress to ~64 KB.
DECODE_CASES: list[tuple[str, Callable[[], bytes], str | None]] = [
    ("gz_plus_64MiB_zeros", lambda: _gz(_nifti() + bytes(64 * MIB)), nio.CODE_TRAILING_DATA),
    ("gz_then_member_of_zeros", lambda: _gz(_nifti()) + _gz(bytes(64 * MIB)), nio.CODE_TRAILING_DATA),
    ("gz_then_garbage", lambda: _gz(_nifti()) + b"garbage after the stream", nio.CODE_TRAILING_DATA),
    ("plain_plus_1MiB", lambda: _nifti() + bytes(MIB), nio.CODE_TRAILING_DATA),
    ("gz_header_declares_4096_cubed", lambda: _gz(_declaring((4096, 4096, 4096))), nio.CODE_TOO_LARGE),
    ("gz_header_declares_more_than_sent", lambda: _gz(_declaring((64, 64, 64))), nio.CODE_TRUNCATED_FILE),
    ("gz_zero_padding_ok", lambda: _gz(_nifti()) + bytes(512), None),
    ("gz_small_slack_ok", lambda: _gz(_nifti() + bytes(100)), None),
    ("gz_multi_member_ok", lambda: _gz(_nifti()[:1000]) + _gz(_nifti()[1000:]), None),
]


@pytest.mark.parametrize("use_isal", [True, False], ids=["isal", "stdlib"])
@pytest.mark.parametrize(("name", "build", "code"), DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_is_bounded_by_the_declared_size(name: str, build: Callable[[], bytes], code: str | None,
                                                use_isal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not use_isal:
        monkeypatch.setattr(nio, "_igzip", None)
    raw = build()
    assert len(raw) < 2 * MIB
    tracemalloc.start()
    try:
        if code is None:
            img = nio.decode_nifti(raw, uri="upload.nii.gz")
            assert img.shape == (48, 48, 48)
        else:
            with pytest.raises(InputError) as info:
                nio.decode_nifti(raw, uri="upload.nii.gz")
            assert info.value.code == code, str(info.value)
            assert "upload.nii.gz" in info.value.message and info.value.hint
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the 48^3 int16 volume is 221 KB; the 64 MiB of zeros behind it are never inflated
    assert peak < 4 * MIB + 2 * len(raw), f"peak {peak / MIB:.1f} MiB"


def test_file_read_is_bounded_and_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(_gz(_nifti() + bytes(64 * MIB)))
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as info:
            val.read_and_validate(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == val.CODE_TRAILING_DATA and str(path) in info.value.message
    assert "221,536" in info.value.message  # the size the header declares (352 + 48^3 * 2)
    assert peak < 8 * MIB


def test_decode_applies_the_callers_voxel_limit() -> None:
    raw = _gz(_nifti())
    with pytest.raises(InputError) as info:
        nio.decode_nifti(raw, uri="x.nii.gz", max_voxels=1000)
    assert info.value.code == nio.CODE_TOO_LARGE and "--max-voxels" in info.value.hint
    assert nio.decode_nifti(raw, uri="x.nii.gz", max_voxels=None).shape == (48, 48, 48)


# --------------------------------------------------------------------------------------------------------------
# Item 5: resampled grid, patch size, overlap, windows, checkpoint shapes
# --------------------------------------------------------------------------------------------------------------


def test_resampled_grid_budget_is_applied_before_resampling() -> None:
    cfg = InferenceConfig()
    affine = np.diag([50.0, 50.0, 50.0, 1.0])  # 40^3 voxels of 50 mm -> 1301^3 voxels at 1.5 mm (MONAI keeps the corner voxels)
    start = time.perf_counter()
    with pytest.raises(InputError) as info:
        check_model_grid((40, 40, 40), affine, cfg, uri="coarse.nii.gz")
    assert time.perf_counter() - start < 1.0
    err = info.value
    assert err.code == "too_large" and "(40, 40, 40)" in err.message and "(1301, 1301, 1301)" in err.message
    assert err.details["n_voxels"] == 1301**3 and err.details["max_voxels"] == cfg.max_voxels


@pytest.mark.parametrize("linear,shape", [
    (np.diag([0.7, 0.9, 2.5]), (61, 53, 29)),
    (np.array([[0, 0, 1.7], [-1.4, 0, 0], [0, -1.6, 0]]), (41, 45, 47)),
    (np.array([[0.96, -0.28, 0], [0.28, 0.96, 0], [0, 0, 1]]) @ np.diag([1.0, 1.1, 3.0]), (33, 35, 17)),
], ids=["anisotropic", "permuted", "oblique"])
def test_resampled_shape_is_the_shape_spacingd_makes(linear: np.ndarray, shape: tuple[int, int, int]) -> None:
    from nvseg_ray.preprocess import IMAGE_KEY, to_meta_tensor

    affine = np.eye(4)
    affine[:3, :3] = linear
    spacingd = upstream_model_grid_chain(InferenceConfig()).transforms[0]
    out = spacingd({IMAGE_KEY: to_meta_tensor(np.zeros(shape, np.float32), affine)})[IMAGE_KEY]
    assert resampled_shape(shape, affine, (1.5, 1.5, 1.5)) == tuple(out.shape[1:])


# (id, InferenceConfig overrides, expected error class, fragment of the message)
CONFIG_CASES: list[tuple[str, dict[str, Any], type[NvsegError], str]] = [
    ("patch_huge", {"patch_size": (4096, 4096, 4096)}, ConfigError, "at most 512"),
    ("patch_too_many_voxels", {"patch_size": (512, 512, 512)}, ConfigError, "above the limit"),
    ("overlap_0999", {"overlap": 0.999}, ConfigError, "between 0 and 0.9"),
    ("overlap_nan", {"overlap": float("nan")}, ConfigError, "overlap"),
    ("sw_batch_huge", {"sw_batch_size": 100000}, ConfigError, "sw_batch_size"),
    ("device_tpu", {"device": "tpu"}, ConfigError, "cuda:N"),
    ("device_bogus", {"device": "bogus"}, ConfigError, "cpu"),
    ("postfix_escape", {"output_postfix": "x/../../../escaped"}, ConfigError, "file-name fragment"),
    ("postfix_backslash", {"output_postfix": "..\\..\\x"}, ConfigError, "file-name fragment"),
    ("postfix_dotdot", {"output_postfix": ".."}, ConfigError, "file-name fragment"),
    ("classes_true", {"classes": [True]}, PromptError, "boolean"),
    ("classes_false_mixed", {"classes": ["liver", False]}, PromptError, "boolean"),
    ("point_nan", {"classes": ["liver"], "points": [(float("nan"), 1, 1)]}, PromptError, "NaN/Inf"),
    ("point_inf", {"classes": ["liver"], "points": [(1, float("inf"), 1)]}, PromptError, "NaN/Inf"),
    ("point_label_float", {"classes": ["liver"], "points": [(1, 1, 1)], "point_labels": [1.5]}, PromptError,
     "point_labels"),
    ("point_label_bool", {"classes": ["liver"], "points": [(1, 1, 1)], "point_labels": [True]}, PromptError,
     "point_labels"),
    ("point_label_2", {"classes": ["liver"], "points": [(1, 1, 1)], "point_labels": [2]}, PromptError, "1 (positive)"),
    ("labels_without_points", {"point_labels": [1]}, PromptError, "without points"),
]


@pytest.mark.parametrize(("name", "overrides", "error", "fragment"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_refuses_hostile_settings(name: str, overrides: dict[str, Any], error: type[NvsegError],
                                         fragment: str) -> None:
    with pytest.raises(NvsegError) as info:
        InferenceConfig.from_sources(None, **overrides)
    assert type(info.value) is error, str(info.value)
    assert fragment in str(info.value) and info.value.exit_code == 2


def test_window_count_matches_monai_and_is_bounded() -> None:
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    for shape, patch, overlap in [((300, 200, 90), (192, 192, 128), 0.25), ((50, 60, 70), (16, 16, 16), 0.9)]:
        padded = [max(s, p) for s, p in zip(shape, patch)]
        expected = len(dense_patch_slices(padded, patch, _get_scan_interval(padded, patch, 3, [overlap] * 3)))
        assert sliding_window_count(shape, patch, overlap) == expected
    cfg = InferenceConfig(patch_size=(16, 16, 16), overlap=0.9)
    with pytest.raises(InputError) as info:
        check_window_count((400, 400, 300), cfg, uri="big.nii.gz")
    assert info.value.code == "too_large" and info.value.details["n_windows"] > MAX_SLIDING_WINDOWS
    assert "--overlap" in info.value.hint
    assert check_window_count((400, 400, 300), InferenceConfig(), uri="big.nii.gz") < 100


def test_checkpoint_implying_a_huge_network_is_refused_before_building() -> None:
    state = make_tiny_state_dict()
    wide = dict(state, **{"image_encoder.encoder.conv_init.weight": torch.zeros(4096, 1, 3, 3, 3)})
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="width 4096"):
        build_network(wide, source="wide.pt")
    many = dict(state, padding=torch.zeros(1).expand(500_000_000))  # 5e8 "parameters", no memory
    with pytest.raises(CheckpointError, match="limit 400,000,000"):
        build_network(many, source="many.pt")
    assert time.perf_counter() - start < 2.0


# --------------------------------------------------------------------------------------------------------------
# Items 8 and 11: unusable volumes, points outside the volume, class tokens
# --------------------------------------------------------------------------------------------------------------


def _volume(tmp_path: Path, name: str, data: np.ndarray, spacing: float = 1.5) -> str:
    return str(save_volume(tmp_path / name, data, np.diag([spacing, spacing, spacing, 1.0])))


def _one_positive_voxel() -> np.ndarray:
    data = np.full((20, 20, 20), -1000, np.int16)
    data[10, 10, 10] = 5
    return data


VOLUME_CASES: list[tuple[str, Callable[[], np.ndarray], float, str]] = [
    ("ct_all_air", lambda: np.full((24, 24, 24), -1024, np.int16), 1.5, val.CODE_EMPTY_VOLUME),
    ("all_zero", lambda: np.zeros((24, 24, 24), np.int16), 1.5, val.CODE_EMPTY_VOLUME),
    ("constant", lambda: np.full((24, 24, 24), 40, np.int16), 1.5, val.CODE_CONSTANT_VOLUME),
    ("foreground_lost_in_resampling", _one_positive_voxel, 0.5, val.CODE_EMPTY_VOLUME),
]


@pytest.mark.parametrize(("name", "build", "spacing", "code"), VOLUME_CASES, ids=[c[0] for c in VOLUME_CASES])
def test_unusable_volume_is_a_typed_error(name: str, build: Callable[[], np.ndarray], spacing: float, code: str,
                                          tiny_checkpoint: str, tmp_path: Path) -> None:
    stages = VolumeStages(InferenceConfig(checkpoint=tiny_checkpoint, classes=["liver"], patch_size=TEST_PATCH,
                                          device="cpu"))
    path = _volume(tmp_path, f"{name}.nii.gz", build(), spacing)
    with pytest.raises(InputError) as info:
        stages.prepare(stages.read(path))
    assert info.value.code == code and path in info.value.message and info.value.hint


@pytest.mark.parametrize("point", [(1000, 1000, 1000), (-1e6, 5, 5), (1e308, 1, 1), (5, 5, 30)],
                         ids=["far", "negative", "1e308", "just_outside_k"])
def test_point_outside_the_volume_is_invalid_prompt(point: tuple[float, float, float], tiny_checkpoint: str,
                                                    tmp_path: Path) -> None:
    cfg = InferenceConfig(checkpoint=tiny_checkpoint, classes=["liver"], points=[point], patch_size=TEST_PATCH,
                          device="cpu")
    path = _volume(tmp_path, "ct.nii.gz", body_phantom((40, 36, 30)))
    stages = VolumeStages(cfg)
    with pytest.raises(PromptError) as info:
        stages.prepare(stages.read(path))
    err = info.value
    assert err.code == "invalid_prompt" and "(40, 36, 30)" in err.message and "i 0..39, j 0..35, k 0..29" in err.message
    assert err.details["shape"] == [40, 36, 30]


def test_point_inside_the_volume_is_accepted(tiny_checkpoint: str, tmp_path: Path) -> None:
    cfg = InferenceConfig(checkpoint=tiny_checkpoint, classes=["liver"], points=[(0, 35, 29.0)], patch_size=TEST_PATCH,
                          device="cpu")
    stages = VolumeStages(cfg)
    prepared = stages.prepare(stages.read(_volume(tmp_path, "ct.nii.gz", body_phantom((40, 36, 30)))))
    assert prepared.points is not None and prepared.points.shape == (1, 3)


def test_class_tokens_that_pass_isdigit_but_not_int_are_names() -> None:
    assert parse_class_list("liver, 3;²,+4") == ["liver", 3, "²", 4]
    catalog = LabelCatalog.default()
    with pytest.raises(PromptError, match="unknown class name"):
        catalog.resolve_prompts(parse_class_list("²"))


def test_tiny_brain_scan_is_a_typed_error(tiny_checkpoint: str, tmp_path: Path) -> None:
    cfg = InferenceConfig(checkpoint=tiny_checkpoint, modality="MRI_BRAIN", patch_size=TEST_PATCH, device="cpu")
    rng = np.random.default_rng(0)
    path = _volume(tmp_path, "t1.nii.gz", rng.integers(10, 500, (6, 6, 6)).astype(np.int16), 1.0)
    stages = VolumeStages(cfg)
    with pytest.raises(InputError) as info:
        stages.prepare(stages.read(path))
    assert info.value.code == "too_small" and "(6, 6, 6)" in info.value.message


# --------------------------------------------------------------------------------------------------------------
# Items 2 and 9: output names stay in the output folder; duplicates are refused
# --------------------------------------------------------------------------------------------------------------


def test_mask_names_never_leave_the_output_folder(tmp_path: Path) -> None:
    cfg = InferenceConfig()
    out = str(tmp_path / "out")
    for name in ("...nii.gz", "..nii.gz", "a/.../scan.nii.gz"):
        target = Path(mask_uri(name, out, cfg, rel_dir="../..")).resolve()
        assert target.is_relative_to(Path(out).resolve()), (name, target)


def test_earlier_claims_finds_duplicate_outputs() -> None:
    cfg = InferenceConfig()
    inputs = ["a/scan.nii.gz", "b/scan.nii.gz", "c/other.nii.gz", "d/scan.nii"]
    claims = earlier_claims((uri, mask_uri(uri, "out", cfg)) for uri in inputs)
    assert claims == [None, "a/scan.nii.gz", None, "a/scan.nii.gz"]


# --------------------------------------------------------------------------------------------------------------
# The CLI: typed exit codes, one bad volume never stops the others
# --------------------------------------------------------------------------------------------------------------


def _nvseg(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nvseg_ray", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--device", "tpu"], "cuda:N"),
    (["--postfix", "x/../../../escaped"], "file-name fragment"),
    (["--classes", "²"], "unknown class name"),
    (["--overlap", "0.999"], "between 0 and 0.9"),
], ids=["device_tpu", "postfix_escape", "class_superscript", "overlap"])
def test_cli_bad_options_exit_2(flags: list[str], fragment: str, tiny_checkpoint: str, tmp_path: Path) -> None:
    path = _volume(tmp_path, "ct.nii.gz", body_phantom((24, 24, 20)))
    args = ["segment", path, "-o", str(tmp_path / "out"), "-c", tiny_checkpoint, "--classes", "liver"]
    proc = _nvseg(*args, *flags)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()


def test_cli_goes_on_after_bad_volumes_and_refuses_duplicates(tiny_checkpoint: str, tmp_path: Path) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    _volume(folder, "good.nii.gz", body_phantom((40, 36, 24)))
    _volume(folder, "air.nii.gz", np.full((24, 24, 24), -1024, np.int16))
    (folder / "bomb.nii.gz").write_bytes(_gz(_nifti((24, 24, 24), 1.5) + bytes(64 * MIB)))
    _volume(folder, "zz_good.nii.gz", body_phantom((36, 40, 24), seed=1))
    for patient, seed in (("a", 2), ("b", 3)):
        (tmp_path / patient).mkdir()
        _volume(tmp_path / patient, "scan.nii.gz", body_phantom((32, 32, 24), seed=seed))
    out = tmp_path / "out"
    proc = _nvseg("segment", str(folder), str(tmp_path / "a" / "scan.nii.gz"), str(tmp_path / "b" / "scan.nii.gz"),
                  "-o", str(out), "-c", tiny_checkpoint, "--classes", "liver,spleen", "--patch-size", "48,48,32",
                  "--device", "cpu", "--overwrite")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for stem in ("good", "zz_good", "scan"):
        assert (out / stem / f"{stem}_trans.nii.gz").is_file(), proc.stdout + proc.stderr
    assert not (out / "air").exists() and not (out / "bomb").exists()
    assert "[empty_volume]" in proc.stderr and "[trailing_data]" in proc.stderr and "[duplicate_output]" in proc.stderr
    assert "3 of 6 volume(s) failed" in proc.stderr
    # patient A's mask is kept (not replaced by B's, even with --overwrite)
    report = (out / "scan" / "scan_trans.json").read_text()
    assert str(tmp_path / "a" / "scan.nii.gz") in report and str(tmp_path / "b") not in report
