"""Batch norm over the global batch under DDP (`vggspec train --sync-bn`).

Without it each process normalises over its own slice of the batch, so N processes train another
network than one process on the same global batch. On CUDA this is torch's SyncBatchNorm, as in
torchvision's reference scripts. torch has no CPU kernels for it (its batch_norm_stats family is
CUDA-only and SyncBatchNorm refuses CPU tensors), so for gloo the same algorithm runs here in plain
tensor ops: per-channel sums, sums of squares and counts all-reduced forward; the two gradient sums
all-reduced backward. The statistics are reduced in float64, so the split does not cost precision.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class _GlobalBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                var: torch.Tensor, eps: float) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        invstd = torch.rsqrt(var + eps).to(x.dtype)
        xhat = (x - mean.to(x.dtype).view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        return xhat * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        xhat, weight, invstd = ctx.saved_tensors
        dims = [d for d in range(dy.dim()) if d != 1]
        shape = [1, -1] + [1] * (dy.dim() - 2)
        # The local sums are this rank's parameter gradients (DDP averages them over ranks); the input
        # gradient needs their global means.
        grad_bias, grad_weight = dy.sum(dims), (dy * xhat).sum(dims)
        sums = torch.stack([grad_bias, grad_weight]).double()
        count = torch.tensor(float(dy.numel() // dy.size(1)), dtype=torch.float64)
        total = _all_reduce(torch.cat([sums.flatten(), count[None]]))
        mean_dy, mean_dy_xhat = (total[:-1] / total[-1]).view(2, -1).to(dy.dtype)
        dx = (dy - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape)) * (weight * invstd).view(shape)
        return dx, grad_weight, grad_bias, None, None, None


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm{1,2,3}d whose training statistics are those of the whole global batch (gloo, CPU)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if not self.affine or not self.track_running_stats:
            raise ValueError("CpuSyncBatchNorm needs affine=True and track_running_stats=True (as vggspec has)")
        factor = self._momentum()
        dims = [d for d in range(x.dim()) if d != 1]
        xd = x.detach().double()
        count = torch.tensor([float(x.numel() // x.size(1))], dtype=torch.float64)
        total = _all_reduce(torch.cat([xd.sum(dims), (xd * xd).sum(dims), count]))
        c, n = x.size(1), total[-1]
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean * mean).clamp_min(0)
        with torch.no_grad():  # the running variance is unbiased, over the global count, as one process has it
            self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean.dtype))
            self.running_var.mul_(1 - factor).add_(factor * (var * n / max(n - 1, 1)).to(self.running_var.dtype))
        return _GlobalBatchNorm.apply(x, self.weight, self.bias, mean, var, self.eps)

    def _momentum(self) -> float:
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else float(self.momentum)


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def convert(module: nn.Module, device: torch.device) -> nn.Module:
    """Every batch norm of `module` synchronised over the process group; the same parameters and buffers."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        new = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        # The same tensors, not copies: the state_dict (keys and values) does not change.
        new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child))
    return module
