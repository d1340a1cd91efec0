"""The ELBO of one batch split by site, computed from the model and guide traces.

The guide is traced with its discrete sites enumerated in parallel (``poutine.enum``, as ``TraceEnum_ELBO``
does: the pose hypotheses, and the classes of a heterogeneous model) and the model replayed against it.
With ``q(e | y_i)`` the joint probability of the enumerated values ``e`` of pattern ``i`` (the product of the
enumerated guide sites' probabilities), every sample site ``s`` of model or guide contributes::

    model site:  + E_q[ scale_s * log p_s ]     (observed sites, factors, latent sites)
    guide site:  - E_q[ scale_s * log q_s ]

where the expectation is the ``q(e | y_i)``-weighted sum over the enumerated values for a site in the
``patterns`` plate and the plain value for a global site (the variational field's ``amplitude``, the
``intensity_prior`` factor), the continuous sites taken at the guide's one draw. ``scale_s`` is what the
plates (``n_total / B``, ``n_pixels / M``) and ``poutine.scale`` (a ``kl_weight``) put on the site. The sum
over sites is the ELBO that ``TraceEnum_ELBO`` computes for guide-side enumeration, at the same draws: every
term of the objective appears, including the intensity prior and the KL of the field's amplitudes.

Example:
    >>> import torch
    >>> from bayes_spi.guides.amortized import AmortizedGuide
    >>> from bayes_spi.models.fields import SirenField
    >>> from bayes_spi.models.spi import MAX_PLATE_NESTING, SPIBatch, SPIModel
    >>> q = torch.randn(256, 3) * 0.03
    >>> model = SPIModel(SirenField(q_max=0.125), q, torch.full((256,), 1e-3), n_hypotheses=2)
    >>> guide = AmortizedGuide(torch.ones(16, 16, dtype=torch.bool), n_heads=1, features=16, channels=4)
    >>> batch = SPIBatch(torch.zeros(3, 16, 16), torch.arange(3), torch.arange(64), 256)
    >>> terms = site_terms(model, guide, batch, 10, max_plate_nesting=MAX_PLATE_NESTING)
    >>> sorted(terms)
    ['counts', 'hypothesis', 'pose', 'scale']
"""

from __future__ import annotations

from typing import Any, Callable

from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

__all__ = ["site_terms"]


def _sample_sites(trace: poutine.Trace) -> dict[str, dict[str, Any]]:
    return {name: site for name, site in trace.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)}


def site_terms(model: Callable[..., Any], guide: Callable[..., Any], *args: Any, max_plate_nesting: int,
               **kwargs: Any) -> dict[str, Tensor]:
    """Each sample site's contribution to the ELBO (a scalar tensor per site name; the values sum to the ELBO).

    A latent site's value is ``E_q[log p_s - log q_s]`` (minus its KL share), an observed or factor site's
    ``E_q[log p_s]``; all with the sites' scales (module doc). ``args``/``kwargs`` go to both model and guide.

    Raises:
        ValueError: a guide site the model does not have (the ELBO would not be defined).
    """
    guide_tr = poutine.trace(poutine.enum(guide, first_available_dim=-1 - max_plate_nesting)).get_trace(*args, **kwargs)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
    guide_tr.compute_log_prob()
    model_tr.compute_log_prob()
    g_sites, m_sites = _sample_sites(guide_tr), _sample_sites(model_tr)
    missing = sorted(set(g_sites) - set(m_sites))
    if missing:
        raise ValueError(f"expected every guide site in the model, got guide-only sites {missing}")
    # q(e | y_i): the enumerated guide sites' joint probability, (E..., 1, ..., B) left of the plates
    log_q_enum: Tensor | int = 0
    for site in g_sites.values():
        if site["infer"].get("enumerate") == "parallel":
            log_q_enum = log_q_enum + site["unscaled_log_prob"]
    weight = None if isinstance(log_q_enum, int) else log_q_enum.exp()

    def expectation(site: dict[str, Any]) -> Tensor:
        lp = site["log_prob"]
        if weight is None or not any(f.vectorized for f in site["cond_indep_stack"]):
            return lp.sum()
        return (weight * lp).sum()

    terms = {name: expectation(site) for name, site in m_sites.items()}
    for name, site in g_sites.items():
        terms[name] = terms[name] - expectation(site)
    return terms

