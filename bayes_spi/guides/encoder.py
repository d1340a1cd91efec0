"""CNN encoder of diffraction patterns (the amortization network of the guide).

The input transform removes the fluence from the pose evidence: counts are divided by the pattern's
mean count over good pixels before ``log1p`` (or ``sqrt``), and masked pixels are set to 0 with the
mask given as a second channel.

Example:
    >>> import torch
    >>> enc = PatternEncoder(n_y=32, n_x=32, features=128)
    >>> enc(torch.rand(5, 32, 32), torch.ones(32, 32, dtype=torch.bool)).shape
    torch.Size([5, 128])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["PatternEncoder", "transform_counts", "TRANSFORMS"]

TRANSFORMS = ("log1p", "sqrt", "root10")


def transform_counts(images: Tensor, mask: Tensor, kind: str = "log1p") -> Tensor:
    """Fluence-normalised, contrast-compressed counts ``(B, n_y, n_x)``, zero on masked pixels."""
    m = mask.to(images.dtype)
    mean = (images * m).sum(dim=(-2, -1), keepdim=True) / m.sum().clamp(min=1.0)
    x = images / mean.clamp(min=1e-6)
    if kind == "log1p":
        x = torch.log1p(x)
    elif kind == "sqrt":
        x = torch.sqrt(x)
    elif kind == "root10":
        x = x.clamp(min=0).pow(0.1)
    else:
        raise ValueError(f"unknown input transform {kind!r}: expected one of {', '.join(TRANSFORMS)}")
    return x * m


class PatternEncoder(nn.Module):
    """VGG-like CNN: ``(B, n_y, n_x)`` counts -> ``(B, features)``.

    Stride-2 stages halve the image until it is at most 8 pixels across, then an adaptive pool to 4x4
    and two dense layers; works for any detector size.
    """

    def __init__(self, n_y: int, n_x: int, features: int = 256, channels: int = 32, transform: str = "log1p") -> None:
        super().__init__()
        if transform not in TRANSFORMS:
            raise ValueError(f"unknown input transform {transform!r}: expected one of {', '.join(TRANSFORMS)}")
        self.transform = transform
        layers: list[nn.Module] = [nn.Conv2d(2, channels, 3, padding=1), nn.GELU()]
        size, ch = max(n_y, n_x), channels
        n_down = max(1, math.ceil(math.log2(max(size, 8) / 8)))
        for _ in range(n_down):
            nxt = min(ch * 2, 256)
            layers += [nn.Conv2d(ch, nxt, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(nxt, nxt, 3, padding=1), nn.GELU()]
            ch = nxt
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(ch * 16, features), nn.GELU(),
                   nn.Linear(features, features), nn.GELU()]
        self.net = nn.Sequential(*layers)
        for mod in self.net.modules():  # He initialisation: keeps per-pattern differences alive through depth
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
                nn.init.zeros_(mod.bias)
        self.features = features
        # standardisation of the transformed counts, set from the first batch seen (a fixed statistic of
        # the data, saved with the module): the mean pattern dominates every raw input, the pose lives in
        # the deviations from it. The mean is per pixel; the spread is pooled over rings of pixels at equal
        # distance from the detector centre (patterns x ring pixels), and floored: at < 1 photon per pixel
        # most pixels are 0 in every pattern of one batch, and a per-pixel spread would divide by ~0.
        self.register_buffer("pixel_mean", torch.full((n_y, n_x), float("nan")))
        self.register_buffer("pixel_std", torch.ones(n_y, n_x))

    @staticmethod
    def ring_index(n_y: int, n_x: int, n_rings: int = 16) -> Tensor:
        """``(n_y, n_x)`` int64 ring of each pixel: distance from the detector centre in ``n_rings`` bins."""
        yy, xx = torch.meshgrid(torch.arange(n_y) - (n_y - 1) / 2, torch.arange(n_x) - (n_x - 1) / 2, indexing="ij")
        r = torch.sqrt(yy**2 + xx**2)
        return (r / (r.max() + 1e-9) * n_rings).long().clamp(max=n_rings - 1)

    @torch.no_grad()
    def set_standardisation(self, x: Tensor, mask: Tensor) -> None:
        """Set ``pixel_mean`` and the ring-pooled, floored ``pixel_std`` from transformed counts ``x (B, n_y, n_x)``."""
        if x.shape[0] < 2:
            raise ValueError(f"expected at least 2 patterns in the first batch, got shape {tuple(x.shape)}")
        self.pixel_mean.copy_(x.mean(0))
        dev = (x - x.mean(0)) * mask.to(x.dtype)
        rings = self.ring_index(*mask.shape).to(x.device)
        std = torch.ones_like(self.pixel_std)
        good = mask.bool()
        overall = dev[:, good].std().clamp(min=1e-3) if good.any() else torch.tensor(1.0)
        for r in range(int(rings.max()) + 1):
            sel = (rings == r) & good
            if sel.any():
                std[rings == r] = dev[:, sel].std() if int(sel.sum()) * x.shape[0] > 1 else overall
        # floor: a ring that is (almost) always empty must not amplify its rare photons
        self.pixel_std.copy_(torch.maximum(std, 0.25 * overall).clamp(min=1e-2))

    def forward(self, images: Tensor, mask: Tensor) -> Tensor:
        if images.dim() != 3 or images.shape[-2:] != mask.shape:
            raise ValueError(
                f"expected images of shape (B, {mask.shape[0]}, {mask.shape[1]}), got shape {tuple(images.shape)}"
            )
        x = transform_counts(images, mask, self.transform)
        if torch.isnan(self.pixel_mean).any():
            self.set_standardisation(x, mask)
        m = mask.to(x.dtype).expand_as(x)
        x = (x - self.pixel_mean) / self.pixel_std * m
        return self.net(torch.stack([x, m], dim=1))
