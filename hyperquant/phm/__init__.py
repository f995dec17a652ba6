from hyperquant.phm.bases import fixed_bases
from hyperquant.phm.functional import factors_to_cat, kron_weight, mix_inputs, phm_forward, phm_macs
from hyperquant.phm.layer import PHMLinear, check_phm_shape
from hyperquant.phm.projection import (
    kronecker_svd,
    mixed_hessian,
    project_activation_aware,
    project_fixed,
)

__all__ = [
    "PHMLinear",
    "check_phm_shape",
    "factors_to_cat",
    "fixed_bases",
    "kron_weight",
    "kronecker_svd",
    "mix_inputs",
    "mixed_hessian",
    "phm_forward",
    "phm_macs",
    "project_activation_aware",
    "project_fixed",
]
