"""Fourier-domain low-rank layers with PolarQuant factors (a comparator to PHM)."""

from hyperquant.fourier.calibration import diag_scale
from hyperquant.fourier.module import FourierLinear
from hyperquant.fourier.polar import PolarQuantized, polar_quantize
from hyperquant.fourier.transform import fourier_lowrank, rank_for_fraction, reconstruct

__all__ = [
    "FourierLinear",
    "PolarQuantized",
    "diag_scale",
    "fourier_lowrank",
    "polar_quantize",
    "rank_for_fraction",
    "reconstruct",
]

# Importing the package registers the "fourier" layer kind.
from hyperquant.fourier.kind import FourierKind, FourierPlan

__all__ += ["FourierKind", "FourierPlan"]
