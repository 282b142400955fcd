"""nvseg_ray.synthetic is the one home of the generated test/benchmark data: no copies elsewhere, same arrays."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nvseg_ray.synthetic import (
    body_phantom,
    save_like_a_converter,
    tiny_state_dict,
    tissue_phantom,
    torso_ct,
    write_torso_ct,
)

REPO = Path(__file__).resolve().parents[1]
#: a function that generates a volume or a checkpoint (what tests and benchmarks each had their own copy of)
GENERATOR = re.compile(r"^\s*def (?!test_)(\w*phantom\w*|\w*synthetic_ct\w*|\w*_ct|save_like_a_converter|save_volume|"
                       r"make_tiny_state_dict|tiny_state_dict)\(", re.M)


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


#: scripts that must run without nvseg_ray installed (the GPU check: torch, monai and nibabel only) keep their own.
SELF_CONTAINED = {"benchmarks/gpu_check.py"}


def test_tests_and_benchmarks_define_no_generators_of_their_own():
    found = [f"{path.relative_to(REPO)}: {m.group(1)}" for folder in ("tests", "benchmarks")
             for path in sorted((REPO / folder).rglob("*.py"))
             if path.relative_to(REPO).as_posix() not in SELF_CONTAINED
             for m in GENERATOR.finditer(path.read_text())]
    assert found == [], "use nvseg_ray.synthetic instead of a local generator"


@pytest.mark.parametrize(("make", "digest"), [
    # the arrays the tests' volumes were built from before the move (tests/model_helpers.py, tests/helpers.py,
    # benchmarks/bench_stages.py): moving the generators must not change a single voxel
    (lambda: body_phantom((48, 44, 22), seed=5), "5eec2666b5766efc"),
    (lambda: tissue_phantom((16, 12, 10, 2), seed=0), "7e15cc6ba860704c"),
    (lambda: torso_ct((40, 36, 20), (2.0, 2.0, 4.0), seed=1), "dd4f892946f78925"),
])
def test_generators_are_seeded_and_unchanged(make, digest):
    first, second = make(), make()
    assert np.array_equal(first, second)
    assert _digest(first) == digest


def test_phantom_content():
    ct = body_phantom((40, 36, 24), seed=0)
    assert ct.dtype == np.int16 and ct.shape == (40, 36, 24)
    assert ct[0, 0, 0] == -1000 and (ct > 600).any()  # air outside, a "spine" inside
    tissue = tissue_phantom((8, 6, 4, 3))
    assert tissue.dtype == np.float64 and tissue.shape == (8, 6, 4, 3)
    assert np.array_equal(tissue[..., 0], tissue[..., 2])  # extra axes repeat the volume
    torso = torso_ct((48, 40, 16), (3.0, 3.0, 5.0), seed=2)
    assert torso.dtype == np.int16 and -1024 <= torso.min() and torso.max() <= 3071
    assert not np.array_equal(torso, torso_ct((48, 40, 16), (3.0, 3.0, 5.0), seed=3))


def test_writers(tmp_path):
    path = write_torso_ct(tmp_path / "ct.nii.gz", (24, 20, 10), (2.0, 2.0, 4.0))
    img = nib.load(str(path))
    assert img.shape == (24, 20, 10) and img.get_data_dtype() == np.int16
    assert np.allclose(img.get_qform(), img.get_sform()) and int(img.header["sform_code"]) == 1
    assert np.allclose(np.diag(img.affine)[:3], [-2.0, -2.0, 4.0])  # LPS-stored axes, as converters write
    again = save_like_a_converter(tmp_path / "again.nii.gz", np.asanyarray(img.dataobj), (2.0, 2.0, 4.0))
    assert np.allclose(nib.load(str(again)).affine, img.affine)


def test_tiny_state_dict_is_seeded():
    a, b = tiny_state_dict(seed=3), tiny_state_dict(seed=3)
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
