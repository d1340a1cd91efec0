"""CNN encoder of diffraction patterns (the amortization network of the guide).

The input transform removes the fluence from the pose evidence: counts are divided by the pattern's
mean count over good pixels before ``log1p`` (or ``sqrt``), and masked pixels are set to 0 with the
mask given as a second channel.

How the encoder sees the detector: a flat grid detector (geometry kind ``"grid"``) is already an image, and the
CNN reads the ``(n_y, n_x)`` array as it is. A per-pixel geometry (kinds ``"positions"`` and ``"q"``: several
panels stacked along ``iy``, gaps, an off-centre beam, tilted panels) is first **assembled**: each pixel is
dropped into the cell of a regular ``(S, S)`` grid in the plane of its projected ``(q_x, q_y)`` (rows along
``q_y``, columns along ``q_x``, the beam ``q = 0`` at the centre cell ``S // 2``), and a cell holds the mean
count of the good pixels that land in it (:func:`assembly_map`, :class:`PatternEncoder` ``pixel_q``). Cells
that no good pixel reaches (panel gaps, the central hole, masked pixels, the outside) are masked: 0 in the
image channel and 0 in the mask channel, exactly like masked pixels of a grid detector. The cell side is the
largest ``(q_x, q_y)`` spacing of array neighbours within a panel (the pixel pitch near the beam), so a panel
facing the beam fills its cells without holes; the grid is capped at ``max_image`` cells across (then a cell
averages several pixels). The CNN therefore sees the multi-panel detector as one picture of reciprocal space,
as a viewer of the assembled detector would; the likelihood and the orientation search still use every pixel's
exact ``q`` and never the assembled image.

Example:
    >>> import torch
    >>> enc = PatternEncoder(n_y=32, n_x=32, features=128)
    >>> enc(torch.rand(5, 32, 32), torch.ones(32, 32, dtype=torch.bool)).shape
    torch.Size([5, 128])
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["PatternEncoder", "assembly_map", "assemble_sums", "transform_counts", "TRANSFORMS"]

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


def assembly_map(pixel_q: np.ndarray | Tensor, max_image: int = 256) -> tuple[Tensor, int, float]:
    """Cell of each pixel in the assembled ``(S, S)`` image (see the module docstring).

    Args:
        pixel_q: ``(n_y, n_x, 3)`` pixel-centre ``q`` (1/A).
        max_image: largest ``S``.

    Returns:
        ``(cell (n_y * n_x,) int64 flat cell index row * S + column, S (odd), cell side in 1/A)``.

    Raises:
        ValueError: wrong shape, non-finite ``q``, or all pixels at the same ``(q_x, q_y)``.
    """
    q = np.asarray(pixel_q.detach().cpu() if isinstance(pixel_q, Tensor) else pixel_q, dtype=np.float64)
    if q.ndim != 3 or q.shape[-1] != 3:
        raise ValueError(f"pixel_q: expected shape (n_y, n_x, 3), got shape {q.shape}")
    if not np.all(np.isfinite(q)):
        raise ValueError("pixel_q: expected finite values, got NaN or infinity")
    qxy = q[..., :2]
    steps = [np.linalg.norm(np.diff(qxy, axis=axis), axis=-1).ravel() for axis in (0, 1) if q.shape[axis] > 1]
    step = np.concatenate(steps) if steps else np.zeros(0)
    step = step[step > 0]
    if step.size == 0:
        raise ValueError("pixel_q: expected pixels at different (q_x, q_y), got all at one point")
    step = step[step <= 2.0 * np.median(step)]  # jumps between panels are not a pixel pitch
    cell = float(np.quantile(step, 0.99))
    half = float(np.abs(qxy).max())
    size = 2 * int(math.ceil(half / cell)) + 1
    if size > max_image:  # coarser cells: a cell averages several pixels
        size = max(max_image if max_image % 2 else max_image - 1, 3)
        cell = half / (size // 2)
    centre = size // 2
    col = np.clip(np.rint(qxy[..., 0] / cell).astype(np.int64) + centre, 0, size - 1)
    row = np.clip(np.rint(qxy[..., 1] / cell).astype(np.int64) + centre, 0, size - 1)
    return torch.as_tensor((row * size + col).ravel()), size, cell


def assemble_sums(values: np.ndarray, good: np.ndarray, pixel_q: np.ndarray,
                  max_image: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell sums of ``values (B, n_y, n_x)`` over the good pixels on the assembled grid of
    :func:`assembly_map`: ``(sums (B, S, S), good pixels per cell (S, S))`` (for pictures of a per-pixel
    detector, e.g. the report's pattern figure)."""
    cell, size, _ = assembly_map(pixel_q, max_image)
    idx = cell.numpy()
    keep = np.asarray(good, dtype=bool).reshape(-1)
    vals = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    sums = np.zeros((len(values), size * size))
    for b in range(len(values)):
        sums[b] = np.bincount(idx[keep], weights=vals[b, keep], minlength=size * size)
    hits = np.bincount(idx[keep], minlength=size * size)
    return sums.reshape(-1, size, size), hits.reshape(size, size)


class PatternEncoder(nn.Module):
    """VGG-like CNN: ``(B, n_y, n_x)`` counts -> ``(B, features)``.

    Stride-2 stages halve the image until it is at most 8 pixels across, then an adaptive pool to 4x4
    and two dense layers; works for any detector size. With ``pixel_q`` (a per-pixel geometry) the patterns
    are first assembled onto an ``(S, S)`` grid in ``(q_x, q_y)`` (see the module docstring).

    Args:
        n_y, n_x: pattern shape.
        features: output width.
        channels: base channels.
        transform: input transform (``log1p``, ``sqrt``, ``root10``).
        pixel_q: optional ``(n_y, n_x, 3)`` pixel-centre ``q`` (1/A): assemble before the CNN.
        max_image: largest assembled image side ``S``.
    """

    def __init__(self, n_y: int, n_x: int, features: int = 256, channels: int = 32, transform: str = "log1p",
                 pixel_q: np.ndarray | Tensor | None = None, max_image: int = 256) -> None:
        super().__init__()
        if transform not in TRANSFORMS:
            raise ValueError(f"unknown input transform {transform!r}: expected one of {', '.join(TRANSFORMS)}")
        self.transform = transform
        self.shape = (int(n_y), int(n_x))
        self.assembled: int | None = None
        if pixel_q is not None:
            if tuple(np.shape(pixel_q)[:2]) != self.shape:
                raise ValueError(f"pixel_q: expected shape ({n_y}, {n_x}, 3), got shape {tuple(np.shape(pixel_q))}")
            cell_index, size, cell = assembly_map(pixel_q, max_image)
            self.register_buffer("cell_index", cell_index, persistent=False)
            self.assembled, self.cell_q = size, cell
            n_y, n_x = size, size
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

    def assemble(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``images (B, n_y, n_x)``, ``mask (n_y, n_x)`` -> assembled ``(B, S, S)`` mean counts per cell and the
        ``(S, S)`` cell mask (True where a good pixel lands); identity without ``pixel_q``."""
        if self.assembled is None:
            return images, mask
        size = self.assembled
        good = mask.reshape(-1).to(images.dtype)
        hits = torch.zeros(size * size, dtype=images.dtype, device=images.device).index_add_(0, self.cell_index, good)
        flat = images.reshape(images.shape[0], -1) * good
        sums = torch.zeros(images.shape[0], size * size, dtype=images.dtype, device=images.device)
        sums = sums.index_add_(1, self.cell_index, flat)
        out = (sums / hits.clamp(min=1.0)).reshape(-1, size, size)
        return out, (hits > 0).reshape(size, size)

    def forward(self, images: Tensor, mask: Tensor) -> Tensor:
        if images.dim() != 3 or images.shape[-2:] != mask.shape:
            raise ValueError(
                f"expected images of shape (B, {mask.shape[0]}, {mask.shape[1]}), got shape {tuple(images.shape)}"
            )
        images, mask = self.assemble(images, mask)
        x = transform_counts(images, mask, self.transform)
        if torch.isnan(self.pixel_mean).any():
            self.set_standardisation(x, mask)
        m = mask.to(x.dtype).expand_as(x)
        x = (x - self.pixel_mean) / self.pixel_std * m
        return self.net(torch.stack([x, m], dim=1))
