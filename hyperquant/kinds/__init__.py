"""Layer kinds: the plan entries that say how a linear is compressed, and the registry that knows each
kind's module. Built in: dense-quant, phm-float, phm-quant, keep, embed-quant; the Fourier comparator
(``hyperquant.fourier``) registers ``fourier`` itself. A new kind is one module plus ``register_kind``."""

from hyperquant.kinds.base import LayerKind, LayerStats, Names, NoExport, PlanEntry
from hyperquant.kinds.dense import ORT_SUPPORTED_BITS, DenseQuantKind, DenseQuantPlan
from hyperquant.kinds.embedding import EmbedQuantKind, EmbedQuantPlan
from hyperquant.kinds.keep import KeepKind, KeepPlan
from hyperquant.kinds.phm import PHMFloatKind, PHMFloatPlan, PHMQuantKind, PHMQuantPlan
from hyperquant.kinds.quantize import QuantFields
from hyperquant.kinds.registry import (
    entry_from_dict,
    kind_named,
    kind_of,
    kind_of_entry,
    register_kind,
    registered_kinds,
    unregister_kind,
)

for _kind in (DenseQuantKind, PHMFloatKind, PHMQuantKind, KeepKind, EmbedQuantKind):
    register_kind(_kind)

__all__ = [
    "ORT_SUPPORTED_BITS",
    "DenseQuantPlan",
    "EmbedQuantPlan",
    "KeepPlan",
    "LayerKind",
    "LayerStats",
    "Names",
    "NoExport",
    "PHMFloatPlan",
    "PHMQuantPlan",
    "PlanEntry",
    "QuantFields",
    "entry_from_dict",
    "kind_named",
    "kind_of",
    "kind_of_entry",
    "register_kind",
    "registered_kinds",
    "unregister_kind",
]
