"""Effort (Yan et al., ICML 2025): train only the smallest singular directions of CLIP's attention weights.

Each chosen projection W [m, n] of the vision tower's self-attention is decomposed once, at build
time, on CPU in float64: W = U diag(S) Vh. The top k = min(m, n) - r components stay frozen as
`weight_main` = W - U_r diag(S_r) Vh_r (so frozen + residual reproduces W to float rounding); the
last r (U_r [m, r], S_r [r], Vh_r [r, n]) are trainable parameters. The forward uses

    W' = weight_main + U_r diag(S_r) Vh_r,   y = x W'^T + bias

Everything frozen is a buffer (weight_main, bias, the frozen singular vectors u_main / vh_main and
||W||_F^2), never a parameter: ZeRO-3 partitions only parameters, so the trainable residuals are the
only thing it shards, and the buffers stay float32 even when DeepSpeed casts the module to bf16/fp16
(`_apply`), so the constraint losses are not drowned in half-precision rounding.

Two constraint losses keep the decomposition meaningful while the residual trains:
- orthogonality: 0.5 ||Û^T Û - I||_F + 0.5 ||V̂ V̂^T - I||_F, with Û = [u_main, U_r], V̂ = [vh_main; Vh_r];
- singular value: | ||W'||_F^2 - ||W||_F^2 |.
Both are ~0 at initialisation. They are computed inside the forward of `SVDResidualCore`, the module
that owns the residual parameters, and returned as one of its outputs: ZeRO-3 gathers a module's
parameters only around its forward and re-gathers them in backward for gradients that reach its
outputs, so the losses see the same gathered tensors the projection uses. `CLIPModel.auxiliary_loss()`
averages them over the projections (as the authors do) and weights them; the training loop adds it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ds_trainer.errors import ConfigError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
_HALF = (torch.float16, torch.bfloat16)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy with row-major strides: DeepSpeed views parameters as bytes, which needs stride(-1) = 1."""
    return torch.empty(t.shape, dtype=torch.float32).copy_(t)


def _fro(a: torch.Tensor) -> torch.Tensor:
    """||a||_F with a zero (sub)gradient at a = 0, where sqrt's derivative is infinite."""
    return a.square().sum().clamp_min(torch.finfo(a.dtype).tiny).sqrt()


class SVDResidualCore(nn.Module):
    """The residual parameters and frozen buffers of one projection; forward returns (y, constraint losses)."""

    def __init__(self, linear: nn.Linear, r: int) -> None:
        super().__init__()
        weight = linear.weight.detach().to("cpu", torch.float64)
        m, n = weight.shape
        if not 1 <= r < min(m, n):
            raise ConfigError(
                f"model.svd_residual.r: {r} residual components of a {m}x{n} projection leave no frozen main part; "
                f"choose 1 <= r < {min(m, n)}"
            )
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        k = min(m, n) - r
        residual = (u[:, k:] * s[k:]) @ vh[k:]
        self.register_buffer("weight_main", _dense(weight - residual))
        bias = linear.bias.detach() if linear.bias is not None else torch.zeros(m)
        self.register_buffer("bias", _dense(bias))
        self.register_buffer("u_main", _dense(u[:, :k]))
        self.register_buffer("vh_main", _dense(vh[:k]))
        # [1], not 0-dim: DeepSpeed's broadcast/partition code views tensors as 1-d.
        self.register_buffer("weight_norm_sq", _dense(weight.square().sum().reshape(1)))
        self.U_r = nn.Parameter(_dense(u[:, k:]))
        self.S_r = nn.Parameter(_dense(s[k:]))
        self.Vh_r = nn.Parameter(_dense(vh[k:]))

    def _apply(self, fn, recurse: bool = True):
        # Buffers keep (at least) float32 through .half()/.bfloat16(): only their device follows `fn`.
        kept = {k: b for k, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for key, old in kept.items():
            new = self._buffers[key]
            if new.dtype in _HALF:
                self._buffers[key] = old.to(device=new.device, dtype=torch.float32)
        return self

    def merged_weight(self) -> torch.Tensor:
        """W' = weight_main + U_r diag(S_r) Vh_r, in the buffers' precision."""
        dtype = self.weight_main.dtype
        return self.weight_main + (self.U_r.to(dtype) * self.S_r.to(dtype)) @ self.Vh_r.to(dtype)

    def constraint_losses(self, weight: torch.Tensor) -> torch.Tensor:
        """[orthogonality, singular value] of the current residual, given W' = `weight`."""
        dtype = self.weight_main.dtype
        u = torch.cat([self.u_main, self.U_r.to(dtype)], dim=1)
        vh = torch.cat([self.vh_main, self.Vh_r.to(dtype)], dim=0)
        eye = torch.eye(u.shape[1], dtype=dtype, device=u.device)
        orthogonal = 0.5 * _fro(u.t() @ u - eye) + 0.5 * _fro(vh @ vh.t() - eye)
        singular = (weight.square().sum() - self.weight_norm_sq[0]).abs()
        return torch.stack([orthogonal, singular])

    def forward(self, x: torch.Tensor, with_losses: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = self.merged_weight()
        y = F.linear(x, weight.to(x.dtype), self.bias.to(x.dtype))
        return y, (self.constraint_losses(weight) if with_losses else None)


class SVDResidualLinear(nn.Module):
    """Drop-in replacement of an `nn.Linear`: returns y only, keeps the last forward's constraint losses."""

    def __init__(self, linear: nn.Linear, r: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.svd = SVDResidualCore(linear, r)
        self.last_losses: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, self.last_losses = self.svd(x, self.training and torch.is_grad_enabled())
        return y

    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` holding W' (and the bias), float32 on CPU: what export saves."""
        core = self.svd
        linear = nn.Linear(self.in_features, self.out_features, bias=True)
        with torch.no_grad():
            linear.weight.copy_(core.merged_weight().detach().float().cpu())
            linear.bias.copy_(core.bias.detach().float().cpu())
        return linear


def apply_svd_residual(tower: nn.Module, r: int, projections: list[str]) -> list[SVDResidualLinear]:
    """Replace `projections` of every self-attention layer of `tower` in place; freezes everything else."""
    unknown = [p for p in projections if p not in PROJECTIONS]
    if unknown:
        raise ConfigError(
            f"model.svd_residual.projections: {', '.join(map(str, unknown))} is not a self-attention projection; "
            f"choose from {', '.join(PROJECTIONS)}"
        )
    tower.requires_grad_(False)
    replaced: list[SVDResidualLinear] = []
    for name, attn in list(tower.named_modules()):
        if not name.endswith("self_attn"):
            continue
        for proj in projections:
            linear = getattr(attn, proj, None)
            if not isinstance(linear, nn.Linear):
                raise ConfigError(f"model.svd_residual.projections: {name}.{proj} is not a linear layer")
            module = SVDResidualLinear(linear, r)
            setattr(attn, proj, module)
            replaced.append(module)
    if not replaced:
        raise ConfigError("model.mode svd-residual: the vision tower has no self-attention layers to decompose")
    return replaced


def merge_svd_residual(tower: nn.Module) -> nn.Module:
    """The tower with every `SVDResidualLinear` replaced by its merged `nn.Linear` (in place)."""
    for module in list(tower.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, SVDResidualLinear):
                setattr(module, child_name, child.to_linear())
    return tower


def auxiliary_loss(modules: list[SVDResidualLinear], orthogonal_weight: float, singular_value_weight: float):
    """Weighted mean over the projections of the last forward's constraint losses, or None outside training."""
    losses = [m.last_losses for m in modules if m.last_losses is not None]
    if not losses:
        return None
    mean = torch.stack(losses).mean(dim=0)
    return orthogonal_weight * mean[0] + singular_value_weight * mean[1]
