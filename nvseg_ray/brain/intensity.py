"""Intensity steps of the brain workflow: T1 plausibility, N4 bias-field correction, white-matter-peak scaling.

All functions take and return (X, Y, Z) float32 arrays on the input grid; ``mask`` is a bool brain mask of the
same shape. None of them moves voxels.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .images import from_sitk, sitk, to_sitk

#: upstream's KDE normalisation: the T1 white-matter peak is mapped to this value before the final scaling.
WM_PEAK_VALUE = 110.0
#: KDE evaluation grid (statsmodels ``KDEUnivariate.fit(gridsize=80)`` in upstream's vendored normaliser).
KDE_GRID_SIZE = 80
#: upper tail dropped before the KDE (upstream keeps voxels below the 96th percentile).
KDE_TAIL_PERCENTILE = 96.0
#: final scaling: divide by this percentile of the positive voxels, then clip to [0, 1] (upstream).
FINAL_PERCENTILE = 99.9
#: a raw T1 head has (almost) no negative voxels; CT air is -1000 HU.
MAX_NEGATIVE_FRACTION = 0.01
#: N4 runs on an image shrunk by this factor (the bias field is smooth), then applies the field at full size.
N4_SHRINK = 4
N4_ITERATIONS = (50, 50, 30)


def check_t1_like(array: np.ndarray, *, uri: str) -> None:
    """Refuse volumes that cannot be a T1-weighted MRI (CT in Hounsfield units, constant images).

    Raises:
        InputError(code="not_t1_like").
    """
    finite = array[np.isfinite(array)]
    if finite.size == 0 or float(finite.max()) <= float(finite.min()):
        raise InputError(f"{uri}: the image is constant, not a T1 MRI", code="not_t1_like")
    negative = float((finite < -1.0).mean())
    if negative > MAX_NEGATIVE_FRACTION:
        raise InputError(
            f"{uri}: {negative:.0%} of the voxels are negative (min {float(finite.min()):.0f}); this looks like a CT "
            "in Hounsfield units, not a T1 MRI", code="not_t1_like",
            hint="use --modality CT_BODY for CT, or --brain-preprocess none for an already preprocessed brain image")


def n4_bias_correct(array: np.ndarray, affine: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """N4 bias-field correction (SimpleITK) inside ``mask``; voxels outside the mask are returned unchanged.

    The field is estimated on the image shrunk by :data:`N4_SHRINK` and applied at full resolution.
    """
    itk = sitk()
    shifted = np.where(mask, np.maximum(array, 0.0), 0.0).astype(np.float32) + 1.0  # N4 needs positive values
    image = to_sitk(shifted, affine)
    mask_image = to_sitk(mask.astype(np.uint8), affine, np.uint8)
    small = itk.Shrink(image, [N4_SHRINK] * 3)
    small_mask = itk.Shrink(mask_image, [N4_SHRINK] * 3)
    n4 = itk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(N4_ITERATIONS))
    n4.Execute(small, small_mask)
    log_field = from_sitk(n4.GetLogBiasFieldAsImage(image))
    corrected = shifted / np.exp(log_field) - 1.0
    return np.where(mask, corrected, array).astype(np.float32)


def kde_peaks(values: np.ndarray, grid_size: int = KDE_GRID_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian KDE (Scott's bandwidth, binned like statsmodels' FFT KDE) of ``values`` on ``grid_size`` points.

    Returns:
        ``(grid, density)``, both float64 of length ``grid_size``; the grid spans min - 3 bw .. max + 3 bw.
    """
    from scipy.ndimage import gaussian_filter1d

    values = np.asarray(values, np.float64)
    bw = 1.059 * min(values.std(), (np.percentile(values, 75) - np.percentile(values, 25)) / 1.349) \
        * values.size ** (-0.2)
    bw = bw if bw > 0 else max(values.std(), 1e-6) * values.size ** (-0.2)
    lo, hi = values.min() - 3 * bw, values.max() + 3 * bw
    fine = 2048
    hist, edges = np.histogram(values, bins=fine, range=(lo, hi), density=True)
    smooth = gaussian_filter1d(hist, sigma=bw / (edges[1] - edges[0]), mode="constant")
    centres = (edges[:-1] + edges[1:]) / 2
    grid = np.linspace(lo, hi, grid_size)
    return grid, np.interp(grid, centres, smooth)


def white_matter_peak(array: np.ndarray, mask: np.ndarray, *, uri: str) -> float:
    """The white-matter intensity of a T1 brain: the last (brightest) peak of the KDE of the brain voxels
    above 1e-6, after dropping the top 4 % tail (upstream's ``KDENormalize`` for T1).

    Raises:
        InputError(code="not_t1_like") when the brain holds no usable voxels or the KDE has no peak.
    """
    from scipy.signal import argrelmax

    values = array[mask & (array > 1e-6)]
    if values.size < 1000:
        raise InputError(f"{uri}: only {values.size} positive voxels inside the brain mask", code="empty_brain_mask")
    values = values[values < np.percentile(values, KDE_TAIL_PERCENTILE)]
    grid, density = kde_peaks(values)
    peaks = argrelmax(density)[0]
    if peaks.size == 0:
        raise InputError(f"{uri}: the brain intensities have no white-matter peak (not a T1 image?)",
                         code="not_t1_like")
    return float(grid[peaks[-1]])


def normalize_wm_peak(array: np.ndarray, mask: np.ndarray, *, uri: str) -> tuple[np.ndarray, float]:
    """Upstream's T1 normalisation: scale so the WM peak is :data:`WM_PEAK_VALUE`, clip negatives to 0, divide
    by the 99.9th percentile of the positive voxels, clip to [0, 1].

    (The last division cancels the WM-peak scale, so the output equals ``clip(array / p99.9, 0, 1)``; the peak
    is still computed, as upstream does, and returned as a quality figure.)

    Returns:
        ``(normalised float32 array, white-matter peak in input units)``.
    """
    peak = white_matter_peak(array, mask, uri=uri)
    scaled = np.maximum(array * (WM_PEAK_VALUE / peak), 0.0)
    positive = scaled[scaled > 0]
    top = float(np.percentile(positive, FINAL_PERCENTILE)) if positive.size else 1.0
    return np.clip(scaled / (top if top > 0 else 1.0), 0.0, 1.0).astype(np.float32), peak
