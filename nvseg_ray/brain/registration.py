"""Affine registration to the brain template, in world (physical) coordinates, with SimpleITK.

Conventions: every transform here is a 4 x 4 **RAS world** matrix ``template_to_input`` mapping a point of the
template's space to the corresponding point of the input scan (ITK's fixed -> moving direction), so that
resampling the input onto the template grid reads the input at ``template_to_input @ template_point`` and the
label revert maps input points back with its inverse.

Why SimpleITK rather than ANTsPy: both wrap ITK's registration and N4; SimpleITK is one self-contained wheel
(no pandas/matplotlib/statsmodels chain), registers in physical space with the images' direction cosines
(upstream wraps arrays with ``ants.from_numpy`` and so registers in voxel space: docs/upstream.md, Brain T1
workflow), and exposes the metric value and stop condition that the quality checks record.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .images import from_sitk, ras_matrix, sitk, sitk_affine_transform, to_sitk
from .template import BrainTemplate

#: multi-resolution schedule: voxel size (mm) of the template at each level (the template is shrunk to it) and
#: Gaussian smoothing (mm); the last level is 2 mm, which recovers the transform to a fraction of a millimetre.
LEVELS_MM = (8.0, 4.0, 2.0)
SMOOTHING_MM = (2.0, 1.0, 0.0)
#: metric samples per level (random, fixed seed: reproducible); fewer made the optimizer wander on heads.
SAMPLES_PER_LEVEL = 80_000
SAMPLING_SEED = 20240917
HISTOGRAM_BINS = 32
#: regular-step gradient descent: initial step (in mm of physical shift), minimum step, iterations per level.
LEARNING_RATE = 2.0
MIN_STEP = 1e-4
MAX_ITERATIONS = 300
RELAXATION = 0.7
#: the metric mask is the template brain mask grown by this much, so the brain's edge counts but a scalp does not.
FIXED_MASK_MARGIN_MM = 4.0


@dataclass(frozen=True)
class AffineRegistration:
    """Result of :func:`register_affine`.

    Attributes:
        template_to_input: 4 x 4 RAS matrix, template world point -> input world point.
        metric: final Mattes mutual-information value (negative; lower is better).
        iterations: optimizer iterations at the last level.
        stop: the optimizer's stop condition (text).
    """

    template_to_input: np.ndarray
    metric: float
    iterations: int
    stop: str


def register_affine(moving: np.ndarray, moving_affine: np.ndarray, template: BrainTemplate, *,
                    initial: np.ndarray | None = None, levels_mm: tuple[float, ...] = LEVELS_MM) -> AffineRegistration:
    """Affine (12-parameter) registration of ``moving`` onto ``template.image`` by Mattes mutual information,
    evaluated inside the template brain mask grown by :data:`FIXED_MASK_MARGIN_MM`.

    Args:
        moving: (X, Y, Z) input intensities (a head or a stripped brain); ``moving_affine``: voxel -> RAS.
        template: the fixed image (its own grid and affine).
        initial: a starting ``template_to_input`` matrix; default: the centres of mass aligned (ITK MOMENTS).
        levels_mm: template voxel size per resolution level (coarse to fine).
    """
    itk = sitk()
    spacing = np.linalg.norm(template.affine[:3, :3], axis=0)
    fixed = to_sitk(template.image, template.affine)
    grown = metric_mask(template)
    moving_image = to_sitk(moving, moving_affine)
    # the finest level samples the template at levels_mm[-1]: average the input down to about that voxel size
    # first (a 0.5 mm head would otherwise be smoothed and interpolated at full size at every level)
    bins = [max(1, int(levels_mm[-1] // s)) for s in moving_image.GetSpacing()]
    if max(bins) > 1:
        moving_image = itk.BinShrink(moving_image, bins)
    if initial is None:
        start = itk.AffineTransform(itk.CenteredTransformInitializer(
            fixed, moving_image, itk.AffineTransform(3), itk.CenteredTransformInitializerFilter.MOMENTS))
    else:
        start = sitk_affine_transform(initial)
    shrink = [max(1, int(round(mm / float(spacing.min())))) for mm in levels_mm]
    n_mask = float(grown.sum())
    method = itk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentagePerLevel([min(1.0, SAMPLES_PER_LEVEL * f**3 / n_mask) for f in shrink],
                                               SAMPLING_SEED)
    method.SetMetricFixedMask(to_sitk(grown.astype(np.uint8), template.affine, np.uint8))
    method.SetInterpolator(itk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=LEARNING_RATE, minStep=MIN_STEP,
                                                    numberOfIterations=MAX_ITERATIONS, relaxationFactor=RELAXATION,
                                                    gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(list(SMOOTHING_MM[: len(shrink)]))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(start, inPlace=True)
    method.Execute(fixed, moving_image)
    return AffineRegistration(template_to_input=ras_matrix(start), metric=float(method.GetMetricValue()),
                              iterations=int(method.GetOptimizerIteration()),
                              stop=method.GetOptimizerStopConditionDescription())


_METRIC_MASKS: dict[str, np.ndarray] = {}


def metric_mask(template: BrainTemplate) -> np.ndarray:
    """The template brain mask grown by :data:`FIXED_MASK_MARGIN_MM` (computed once per template and process:
    every registration of every scan uses it, and the distance transform takes ~1 s at 1 mm)."""
    if template.sha256 not in _METRIC_MASKS:
        from scipy.ndimage import distance_transform_edt

        spacing = np.linalg.norm(template.affine[:3, :3], axis=0)
        _METRIC_MASKS[template.sha256] = distance_transform_edt(~template.mask, sampling=spacing) \
            <= FIXED_MASK_MARGIN_MM
    return _METRIC_MASKS[template.sha256]


def warp_to_template(array: np.ndarray, affine: np.ndarray, template: BrainTemplate, template_to_input: np.ndarray,
                     *, nearest: bool = False) -> np.ndarray:
    """Resample an input-grid image onto the template grid (linear, or nearest for masks); 0 outside the input.

    Returns:
        (template X, Y, Z) float32 (nearest: the input's values, cast to float32).
    """
    itk = sitk()
    reference = to_sitk(np.zeros(template.shape, np.uint8), template.affine, np.uint8)
    image = to_sitk(array, affine)
    interpolator = itk.sitkNearestNeighbor if nearest else itk.sitkLinear
    out = itk.Resample(image, reference, sitk_affine_transform(template_to_input), interpolator, 0.0, itk.sitkFloat32)
    return from_sitk(out)


def map_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4 x 4 matrix to (N, 3) points."""
    points = np.asarray(points, float)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def normalized_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of ``a`` and ``b`` inside ``mask`` (registration quality; 1 = identical up to scale)."""
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else 0.0
