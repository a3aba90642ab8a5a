"""The one-class softmax head (OC-softmax; Zhang, Jiang and Duan 2021), as AntiDeepfake's
``models/oc_softmax.py`` defines it (0dea622).

One weight vector ``w`` (kept renormalised to unit length inside the forward), the cosine between it
and the pooled embedding as the score: bona fide speech is pulled above ``cos = w_posi`` (0.9), spoofs
are pushed below ``w_nega`` (0.2), each through ``softplus(alpha * margin)`` with scale ``alpha`` 20.
The head outputs ``[-cos, cos]`` (AntiDeepfake's ``flag_angle_only`` output), so column 1 is the
bona fide score as for the linear head; but a cosine is not a logit: P(bona fide) only comes from a
fitted calibration. tests/models/test_oc_softmax.py compares it with AD's own outputs and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

W_POSI = 0.9
W_NEGA = 0.2
ALPHA = 20.0
# AD's renorm(2, 1, 1e-5).mul(1e5): unit length up to torch's renorm eps (a column is scaled by
# 1e-5 / (norm + 1e-7)); kept literally so the weights match AD's bit for bit
RENORM_MAX = 1e-5
RENORM_SCALE = 1e5


class OCSoftmaxHead(nn.Module):
    """``weight`` is ``(in_features, 1)``, AntiDeepfake's layout (a converted release loads as it is)."""

    def __init__(self, in_features: int, *, w_posi: float = W_POSI, w_nega: float = W_NEGA, alpha: float = ALPHA):
        super().__init__()
        self.in_features = in_features
        self.w_posi, self.w_nega, self.alpha = w_posi, w_nega, alpha
        self.weight = nn.Parameter(torch.empty(in_features, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, 0.25)
        with torch.no_grad():
            self.weight.renorm_(2, 1, RENORM_MAX).mul_(RENORM_SCALE)

    def cosine(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(B,)`` cosine between each embedding and the unit weight vector, clamped to [-1, 1]."""
        unit = self.weight.renorm(2, 1, RENORM_MAX).mul(RENORM_SCALE)
        cos = pooled.mm(unit.to(pooled.dtype)).squeeze(1) / pooled.pow(2).sum(1).pow(0.5)
        return cos.clamp(-1, 1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(pooled)
        return torch.stack([-cos, cos], dim=1)

    def sample_losses(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample OC-softmax loss from ``forward``'s outputs; labels 1 = bona fide, 0 = spoof."""
        cos = outputs[:, 1]
        margin = torch.where(labels.bool(), self.alpha * (self.w_posi - cos), self.alpha * (cos - self.w_nega))
        return F.softplus(margin)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, w_posi={self.w_posi}, w_nega={self.w_nega}, alpha={self.alpha}"
