"""PHMLinear: a drop-in replacement for nn.Linear with W = sum_b H_b kron A_b."""

from __future__ import annotations

import math

import torch
from torch import nn

from hyperquant.convert import linear_weight
from hyperquant.phm.bases import fixed_bases
from hyperquant.phm.functional import factors_to_cat, kron_weight, phm_forward, phm_macs
from hyperquant.phm.projection import kronecker_svd, project_activation_aware, project_fixed


def check_phm_shape(in_features: int, out_features: int, n: int, num_bases: int) -> None:
    if n < 1 or in_features % n or out_features % n:
        raise ValueError(
            f"n={n} must divide both in_features={in_features} and out_features={out_features}; "
            f"pick an n that divides both (e.g. 2 or 4)"
        )
    if not 1 <= num_bases <= n * n:
        raise ValueError(f"num_bases={num_bases} must be in [1, n^2={n * n}] for n={n}")


class PHMLinear(nn.Module):
    """y = x W^T + bias with W = sum_b H_b kron A_b, computed without materializing W.

    ``bases`` (B, n, n) are fixed (a buffer) unless ``learn_bases``; ``factors`` are (B, out/n, in/n).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n: int = 2,
        num_bases: int = 2,
        bias: bool = True,
        learn_bases: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_phm_shape(in_features, out_features, n, num_bases)
        self.in_features, self.out_features = in_features, out_features
        self.n, self.num_bases, self.learn_bases = n, num_bases, learn_bases
        kw = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        bases = fixed_bases(n, num_bases).to(**kw)
        if learn_bases:
            self.bases = nn.Parameter(bases)
        else:
            self.register_buffer("bases", bases)
        self.factors = nn.Parameter(torch.empty(num_bases, out_features // n, in_features // n, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Match nn.Linear's output scale: each output sums in/n * B * n terms through the bases.
        bound = 1.0 / math.sqrt(self.in_features * self.num_bases)
        nn.init.uniform_(self.factors, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1.0 / math.sqrt(self.in_features), 1.0 / math.sqrt(self.in_features))

    @property
    def a_cat(self) -> torch.Tensor:
        """A_cat = [A_1 | ... | A_B], (out/n, B*in/n): the one linear map the forward applies."""
        return factors_to_cat(self.factors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return phm_forward(x, self.bases, self.a_cat, self.bias)

    def effective_weight(self) -> torch.Tensor:
        """sum_b H_b kron A_b, (out, in) like nn.Linear.weight. Materializes W: for tests and analysis."""
        return kron_weight(self.bases, self.factors)

    def num_parameters(self) -> int:
        count = self.factors.numel() + (self.bias.numel() if self.bias is not None else 0)
        return count + (self.bases.numel() if self.learn_bases else 0)

    def macs_per_token(self) -> dict[str, int]:
        return phm_macs(self.in_features, self.out_features, self.n, self.num_bases)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, n={self.n}, "
            f"num_bases={self.num_bases}, bias={self.bias is not None}, learn_bases={self.learn_bases}"
        )

    @classmethod
    def from_dense(
        cls,
        weight_or_linear: torch.Tensor | nn.Module,
        n: int = 2,
        num_bases: int = 2,
        learn_bases: bool = False,
        bias: torch.Tensor | None = None,
        input_cov: torch.Tensor | None = None,
        ridge: float = 1e-4,
    ) -> PHMLinear:
        """Project a dense weight (out, in) or an nn.Linear onto the PHM family.

        Fixed bases: the exact least-squares projection. Learned bases: the optimal rank-B Kronecker
        approximation (Kronecker SVD). With ``input_cov`` (sum of x x^T over calibration tokens) the
        factors instead minimize the layer's output error on those inputs (activation-aware).
        """
        if isinstance(weight_or_linear, nn.Module):
            weight = linear_weight(weight_or_linear)  # (out, in), also for GPT-2's transposed Conv1D
            if bias is None and getattr(weight_or_linear, "bias", None) is not None:
                bias = weight_or_linear.bias.detach()
        else:
            weight = weight_or_linear.detach()
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, n=n, num_bases=num_bases, bias=bias is not None, learn_bases=learn_bases,
                    dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            if learn_bases:
                bases, factors = kronecker_svd(weight, n, num_bases)
                layer.bases.copy_(bases)
            else:
                factors = project_fixed(weight, layer.bases)
            if input_cov is not None:
                factors = project_activation_aware(weight, layer.bases, input_cov, ridge=ridge)
            layer.factors.copy_(factors)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer
