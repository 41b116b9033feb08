"""The KaSA layer: a frozen Linear or Conv1D plus any number of named adapters.

The base weight is never modified (except inside ``merge``, which keeps an exact copy),
so disabling or removing the adapter gives back the original layer bit for bit. The
truncation is applied as a low-rank correction instead:

    y = base(x) - x Vh^T diag(S) U^T + scaling * (d * (x A^T)) B^T

where ``U diag(S) Vh`` is the removed component of the r smallest singular triplets.
Every matrix here is in (out, in) orientation; Conv1D stores its weight as (in, out),
which only ``base_weight_matrix`` and the merge code have to know.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .targeting import is_conv1d
from .truncation import Truncation

# Adapter parameters and removed factors use float32 when the base weight is half
# precision, as PEFT does by default: the low-rank factors are small, and float16
# factors would lose the truncation's accuracy.
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def adapter_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """Return the dtype adapter tensors use beside a base weight of ``weight_dtype``."""
    return torch.float32 if weight_dtype in _HALF_DTYPES else weight_dtype


class KasaAdapter(nn.Module):
    """One KaSA adapter for one layer: trainable ``B diag(d) A`` and the removed component.

    Parameters ``lora_A`` (r, in), ``lora_B`` (out, r) and ``lora_diag`` (r,) are trained.
    Buffers ``removed_U`` (out, r), ``removed_S`` (r,) and ``removed_Vh`` (r, in) hold the
    r smallest singular triplets of the base weight and stay frozen.
    """

    def __init__(self, truncation: Truncation, scaling: float, dropout: float, dtype: torch.dtype) -> None:
        super().__init__()
        out_features, r = truncation.U.shape
        in_features = truncation.Vh.shape[1]
        device = truncation.U.device
        self.r = r
        self.scaling = float(scaling)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))
        self.lora_diag = nn.Parameter(torch.randn(r, dtype=dtype, device=device))
        # Kaiming-uniform, as LoRA initialises A; B = 0 makes the update zero at step 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.register_buffer("removed_U", truncation.U.to(dtype).contiguous())
        self.register_buffer("removed_S", truncation.S.to(dtype).contiguous())
        self.register_buffer("removed_Vh", truncation.Vh.to(dtype).contiguous())
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def low_rank_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(h, up)`` with the adapter's output equal to ``h @ up.T``.

        ``h`` (..., 2r) stacks ``scaling * d * (x A^T)`` and ``-S * (x Vh^T)``, and ``up``
        (out, 2r) stacks ``B`` and ``U``, so the two rank-r branches cost one matrix
        product each way instead of two. With dropout the update branch takes a dropped
        input, so the down projections are computed separately.
        """
        x = x.to(self.lora_A.dtype)
        coefficients = torch.cat([self.lora_diag * self.scaling, -self.removed_S])
        if isinstance(self.dropout, nn.Identity):
            h = F.linear(x, torch.cat([self.lora_A, self.removed_Vh])) * coefficients
        else:
            h = torch.cat([F.linear(self.dropout(x), self.lora_A), F.linear(x, self.removed_Vh)], dim=-1) * coefficients
        return h, torch.cat([self.lora_B, self.removed_U], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the adapter's additive output for input ``x`` (..., in)."""
        h, up = self.low_rank_parts(x)
        return F.linear(h, up)

    def update_weight(self) -> torch.Tensor:
        """Return the learned update ``scaling * B diag(d) A`` as an (out, in) matrix."""
        return (self.lora_B * self.lora_diag) @ self.lora_A * self.scaling

    def removed_weight(self) -> torch.Tensor:
        """Return the removed component ``U diag(S) Vh`` as an (out, in) matrix."""
        return (self.removed_U * self.removed_S) @ self.removed_Vh

    def delta_weight(self) -> torch.Tensor:
        """Return the total change to the base weight, (out, in): update minus removed part."""
        return self.update_weight() - self.removed_weight()

    def truncation(self) -> Truncation:
        """Return the stored removed triplets as a ``Truncation``."""
        return Truncation(U=self.removed_U, S=self.removed_S, Vh=self.removed_Vh)

    def regularization(self, beta: float, gamma: float, gram_convention: str = "paper") -> torch.Tensor:
        """Return ``beta * sum(d^2) + gamma * (||B^T B - I||_F + ||A A^T - I||_F)`` in float32.

        With ``gram_convention="reference-code"`` the norms use the out x out and in x in
        Gram matrices instead. They are computed from the r x r ones through
        ``||M M^T - I_n||_F^2 = ||M^T M||_F^2 - 2 tr(M^T M) + n``, so the cost is
        O(r^2 (out + in)) either way.
        """
        diag = self.lora_diag.float()
        a = self.lora_A.float()
        b = self.lora_B.float()
        gram_b = b.T @ b
        gram_a = a @ a.T
        if gram_convention == "paper":
            orthogonality = _distance_to_identity(gram_b) + _distance_to_identity(gram_a)
        else:
            orthogonality = _outer_distance_to_identity(gram_b, b.shape[0]) + _outer_distance_to_identity(
                gram_a, a.shape[1]
            )
        return beta * (diag * diag).sum() + gamma * orthogonality


def _distance_to_identity(gram: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.matrix_norm(gram - eye)


def _outer_distance_to_identity(gram: torch.Tensor, n: int) -> torch.Tensor:
    # ||M M^T - I_n||_F for M with Gram matrix M^T M = gram, without forming the n x n matrix.
    squared = (gram * gram).sum() - 2 * torch.diagonal(gram).sum() + n
    return torch.sqrt(squared.clamp_min(0.0))


class KasaLayer(nn.Module):
    """A frozen ``nn.Linear`` or transformers ``Conv1D`` with named KaSA adapters.

    At most one adapter is active. While ``disabled`` is set, or no adapter is active, the
    layer computes exactly what the base layer computes.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kasa_adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapter: str | None = None
        self._weight_before_merge: torch.Tensor | None = None
        self.fan_in_fan_out = is_conv1d(base_layer)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, in the base layer's own orientation."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return self.base_layer.bias

    def base_weight_matrix(self) -> torch.Tensor:
        """Return the base weight in (out, in) orientation (a view, not a copy)."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def add_adapter(self, name: str, truncation: Truncation, scaling: float, dropout: float) -> KasaAdapter:
        """Create adapter ``name`` from the removed triplets ``truncation``."""
        weight = self.base_weight_matrix()
        if tuple(truncation.U.shape[:1]) + tuple(truncation.Vh.shape[1:]) != tuple(weight.shape):
            raise ValueError(
                f"truncation factors of shape U={tuple(truncation.U.shape)}, Vh={tuple(truncation.Vh.shape)} "
                f"do not fit a weight of shape {tuple(weight.shape)} (out, in)."
            )
        moved = Truncation(U=truncation.U.to(weight.device), S=truncation.S.to(weight.device), Vh=truncation.Vh.to(weight.device))
        adapter = KasaAdapter(moved, scaling=scaling, dropout=dropout, dtype=adapter_dtype_for(weight.dtype))
        self.kasa_adapters[name] = adapter
        return adapter

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (unmerging it first if it is merged)."""
        if self.merged_adapter == name:
            self.unmerge()
        del self.kasa_adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.active_adapter is None or self.merged_adapter is not None:
            return result
        adapter = self.kasa_adapters[self.active_adapter]
        h, up = adapter.low_rank_parts(x)
        if h.dtype != result.dtype:
            return result + F.linear(h, up).to(result.dtype)
        # One fused multiply-add over the output instead of a product and a separate sum.
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), up.T)
        return flat.view(result.shape)

    def _delta_in_base_orientation(self, name: str) -> torch.Tensor:
        delta = self.kasa_adapters[name].delta_weight()
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, name: str | None = None, keep_original: bool = True) -> None:
        """Fold adapter ``name`` (default: the active one) into the base weight.

        The sum is formed in float32 (or float64 for a float64 weight) and rounded once.
        With ``keep_original`` the original weight is kept so that ``unmerge`` restores it
        exactly, at the cost of one copy of the weight in memory.
        """
        name = name or self.active_adapter
        if name is None:
            raise ValueError("no adapter to merge: set an active adapter first.")
        if self.merged_adapter is not None:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is already merged; call unmerge() first.")
        weight = self.base_layer.weight
        compute_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        delta = self._delta_in_base_orientation(name).to(compute_dtype)
        if keep_original:
            self._weight_before_merge = weight.detach().clone()
        weight.copy_((weight.to(compute_dtype) + delta).to(weight.dtype))
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weight that ``merge`` replaced."""
        if self.merged_adapter is None:
            return
        if self._weight_before_merge is None:
            raise RuntimeError("this layer was merged without keeping the original weight, so it cannot be unmerged.")
        self.base_layer.weight.copy_(self._weight_before_merge)
        self._weight_before_merge = None
        self.merged_adapter = None

    def extra_repr(self) -> str:
        return f"adapters={list(self.kasa_adapters)}, active={self.active_adapter!r}, conv1d={self.fan_in_fan_out}"
