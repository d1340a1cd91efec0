r"""A measured per-pixel background as an additive Poisson rate, and the fluence profiled in its presence.

With a background map ``B_k`` (mean background photons per pixel per pattern, e.g. the mean of the non-hit
frames, read by :func:`bayes_spi.dataio.masks.read_pixel_map`) the expected count of pixel ``k`` of pattern
``i`` is::

    lambda_ik = s_i * w_k * I(R_i q_k)  +  b * B_k            (w_k = solid angle x polarization)

with a fitted background scale ``b`` (:class:`PixelBackground`): one for the whole data set (``global``, the
default: a point estimate, maximum likelihood, no prior) or one per pattern (``per-pattern``: a vector of
point estimates indexed by the pattern, updated by the SVI steps that see the pattern and by the exact EMC
iterations). ``b = 1`` means the map as measured; the simulator (``bayes-spi simulate --background``) adds
``Poisson(B_k)`` photons with exactly this meaning.

Where the fluence ``s`` is profiled out (orientation search, EMC warm start and iterations, local pose
refinement) there is no closed form any more; :func:`profile_with_background` maximises
``f(s) = sum_k y_k log(s a_k + c_k) - s sum_k a_k`` (concave in ``s``) by safeguarded Newton steps, starting
from ``max(N - C, N / 10) / A``. Without background (``c = 0``) it reduces to ``s = N / A``.

Example:
    >>> import torch
    >>> a = torch.tensor([[1.0, 2.0, 3.0]]); c = torch.tensor([0.5, 0.5, 0.5]); y = torch.tensor([[2.0, 3.0, 4.0]])
    >>> ll, log_s = profile_with_background(a.log(), y, c)
    >>> s = log_s.exp()
    >>> bool(abs(float((y * a / (s[:, None] * a + c)).sum() - a.sum())) < 1e-4)   # f'(s) = 0
    True
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BACKGROUND_SCALE_MODES", "PixelBackground", "profile_with_background"]

#: values of ``--background-scale``
BACKGROUND_SCALE_MODES: tuple[str, ...] = ("global", "per-pattern")


class PixelBackground(nn.Module):
    """``b * B_k``: a measured background map with a fitted scale (see the module docstring).

    Args:
        rate: ``(P,)`` background photons per pixel per pattern (all detector pixels, row-major; >= 0).
        mode: ``"global"`` (one scale) or ``"per-pattern"`` (``n_patterns`` scales).
        n_patterns: number of patterns (``per-pattern`` only).
    """

    def __init__(self, rate: Tensor, mode: str = "global", n_patterns: int = 0) -> None:
        super().__init__()
        if mode not in BACKGROUND_SCALE_MODES:
            raise ValueError(f"background scale: expected one of {BACKGROUND_SCALE_MODES}, got {mode!r}")
        rate = torch.as_tensor(rate).reshape(-1)
        if not bool(torch.isfinite(rate).all()) or bool((rate < 0).any()):
            raise ValueError("background: expected finite rates >= 0 (photons per pixel per pattern)")
        if mode == "per-pattern" and n_patterns < 1:
            raise ValueError(f"background scale per-pattern: expected n_patterns >= 1, got {n_patterns}")
        self.mode = mode
        self.register_buffer("rate", rate.float())
        self.log_scale = nn.Parameter(torch.zeros(() if mode == "global" else (int(n_patterns),)))

    def scale(self, indices: Tensor | None = None) -> Tensor:
        """The scale ``b``: ``()`` (global, or per-pattern without ``indices``: the geometric mean of all
        patterns' scales, what a guide that does not know the pattern uses) or ``(B,)`` at ``indices``."""
        if self.mode == "global":
            return self.log_scale.exp()
        if indices is None:
            return self.log_scale.mean().exp()
        return self.log_scale[indices.to(self.log_scale.device).long()].exp()

    def forward(self, pixels: Tensor, indices: Tensor | None = None) -> Tensor:
        """Expected background counts on ``pixels (M,)``: ``(M,)``, or ``(B, M)`` per pattern at ``indices``."""
        b = self.scale(indices)
        rate = self.rate[pixels]
        return b[..., None] * rate if b.dim() else b * rate

    @torch.no_grad()
    def set_scale(self, value: Tensor, indices: Tensor | None = None) -> None:
        """Overwrite the scale (``()``) or the scales of ``indices (B,)`` with ``value (B,)`` (clamped > 0)."""
        log_v = torch.as_tensor(value, dtype=self.log_scale.dtype, device=self.log_scale.device).clamp(min=1e-12).log()
        if self.mode == "global" or indices is None:
            self.log_scale.copy_(log_v.expand_as(self.log_scale))
        else:
            self.log_scale[indices.to(self.log_scale.device).long()] = log_v


@torch.no_grad()
def _newton_scale(a: Tensor, y: Tensor, c: Tensor, n_iter: int) -> Tensor:
    """The maximiser ``s (...)`` of ``sum_k y log(s a + c) - s sum_k a`` over ``s > 0`` (``a > 0``, ``c >= 0``)."""
    a_sum = a.sum(-1)
    n_tot = y.sum(-1)
    c_sum = c.sum(-1) if c.dim() else c * a.shape[-1]
    floor = 1e-6 * n_tot.clamp(min=1.0) / a_sum
    s = (torch.maximum(n_tot - c_sum, 0.1 * n_tot) / a_sum).clamp(min=1e-12)
    s = torch.maximum(s, floor)
    for _ in range(n_iter):
        mu = s[..., None] * a + c
        ratio = y * a / mu
        d1 = ratio.sum(-1) - a_sum
        d2 = -(ratio * a / mu).sum(-1)
        step = torch.where(d2 < 0, -d1 / d2.clamp(max=-1e-30), torch.zeros_like(d1))
        s = torch.maximum(s + step, torch.maximum(0.1 * s, floor))
    return s


def profile_with_background(log_a: Tensor, y: Tensor, c: Tensor, n_iter: int = 5) -> tuple[Tensor, Tensor]:
    """Poisson log-likelihood with the fluence profiled out, in the presence of an additive background.

    Args:
        log_a: ``(..., M)`` log signal per unit fluence (``log w_k + log I``), differentiable.
        y: counts, broadcastable to ``log_a``; c: background counts ``b B_k``, broadcastable (>= 0).
        n_iter: Newton iterations for the scale.

    Returns:
        ``ll (...)`` = ``sum_k y_k log(s a_k + c_k) - s A - C - (N log N - N)`` at the profile ``s`` (the last
        term makes it equal to the background-free ``sum y log a - N log A`` when ``c = 0``; ``N = max(N, 1)``
        inside the log), differentiable w.r.t. ``log_a`` through ``a`` only (``s`` is at the optimum: envelope
        theorem), and the profile ``log s (...)`` (detached).
    """
    a = log_a.exp()
    y_b = y.to(a.dtype)
    c = c.to(a.dtype)
    s = _newton_scale(a.detach(), y_b, c, n_iter)
    mu = s[..., None] * a + c
    n_tot = y_b.sum(-1)
    c_sum = c.sum(-1) if c.dim() else c * a.shape[-1]
    ll = (y_b * mu.clamp(min=1e-30).log()).sum(-1) - s * a.sum(-1) - c_sum
    ll = ll - (n_tot * n_tot.clamp(min=1.0).log() - n_tot)
    return ll, s.log()
