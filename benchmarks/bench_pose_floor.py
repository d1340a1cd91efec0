"""Where a fit's pose floor comes from: the data, the field, or an error all poses share.

For a fitted run on simulated data (the structure known): the first ``--patterns`` patterns' poses from the default
export (the most probable hypothesis), aligned to the truth by the best global rotation ``G``; then the TRUE poses,
mapped into the fit's frame, refined (Gauss-Newton, every good pixel, fluence profiled) on

* the fitted field's export cube and, with ``--field``, on the field itself;
* the exact true intensity (the structure's NUFFT on cubes as fine as the export cube and twice as fine):
  the data's own limit.

Printed: the median and rms error of each against the truth, the cosine between the export's error vectors and those
of the true poses refined on the field (near 1: the export sits where the field puts the truth), and the share of the
field's pose errors a linear stretch of its ``q``-space explains (a pattern with beam direction ``n`` in the field's
frame tilts by ``n x S n``, ``S`` symmetric; the eigenvalues of ``S``'s trace-free part). An error that every pose
shares is one the field-error split (:mod:`bayes_spi.posterior.fielderror`) cannot see (BENCHMARKS.md, fourteenth
session: 2CEX at 1e4 photons on 32x32, 0.46 deg on the truth, 1.98 on a 45^3-voxel field, 81% a stretch).

Example::

    python benchmarks/bench_pose_floor.py RUN DATA.h5 2CEX --patterns 512 --field
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

__all__ = ["stretch_share"]


def stretch_share(errors: np.ndarray, rotations: np.ndarray) -> tuple[float, np.ndarray]:
    """Share of the pose errors ``errors (N, 3)`` (rotation vectors, lab frame: ``R_true = R exp(e)``) explained by
    a symmetric stretch ``S`` of the field's ``q``-space, and the eigenvalues of ``S``'s trace-free part.
    ``rotations (N, 3, 3)``: the true poses in the field's frame (lab ``q`` -> field frame)."""
    em = np.einsum("nij,nj->ni", rotations, errors)  # the error in the field's frame
    beam = rotations[:, :, 2]
    basis = []
    for i in range(3):
        for j in range(i, 3):
            b = np.zeros((3, 3))
            b[i, j] = b[j, i] = 1.0
            basis.append(b)
    design = np.stack([np.cross(beam, beam @ b.T) for b in basis], -1).reshape(-1, len(basis))
    coef, *_ = np.linalg.lstsq(design, em.reshape(-1), rcond=None)
    resid = em.reshape(-1) - design @ coef
    s = sum(c * b for c, b in zip(coef, basis))
    return float(1 - (resid ** 2).sum() / (em ** 2).sum()), np.linalg.eigvalsh(s - np.trace(s) / 3 * np.eye(3))


def main() -> None:
    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.infer.load import load_trained
    from bayes_spi.metrics import align_rotations
    from bayes_spi.posterior.mixture import MixturePosterior
    from bayes_spi.posterior.netcdf import ExportSettings, export_cache_grid, export_log_cube, guide_batches
    from bayes_spi.posterior.refine import cached_log_intensity, refine_posterior
    from bayes_spi.sim.structure import load_structure
    from bayes_spi.sim.transform import intensity_from_transform, transform_on_grid
    from bayes_spi.so3 import rotmat_to_rotvec

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("data")
    ap.add_argument("structure", help="the simulated structure (a PDB/mmCIF file or a packaged name, e.g. 2CEX)")
    ap.add_argument("--patterns", type=int, default=512)
    ap.add_argument("--field", action="store_true", help="also refine on the field itself (slower)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    trained = load_trained(args.run)
    model, guide = trained.model, trained.guide
    ds = SPIDataset(args.data)
    n = min(args.patterns, ds.n_patterns)
    r_exp, ls_exp = [], []
    for _, _, post in guide_batches(trained, ds, ExportSettings(max_patterns=n)):
        k = post.weights.argmax(-1)
        b = torch.arange(k.numel())
        r_exp.append(post.rotations[b, k].double())
        ls_exp.append(post.log_scale_loc[b, k].float())
    r_exp, ls_exp = torch.cat(r_exp), torch.cat(ls_exp)
    r_true = ds.truth_rotations()[:n]
    g, _, _ = align_rotations(r_exp.numpy(), r_true)
    r_fit = torch.as_tensor(g.T @ r_true)  # the true poses in the field's frame
    good = torch.nonzero(guide.mask.reshape(-1) & torch.as_tensor(ds.mask.reshape(-1))).squeeze(-1)
    images = torch.as_tensor(ds.read(np.arange(n)))
    n_grid = export_cache_grid(guide)
    cube = export_log_cube(model.field, n_grid, model.q_max)

    def refine(log_intensity) -> torch.Tensor:
        out = []
        for a in range(0, n, 64):
            r = r_fit[a:a + 64].float()[:, None]
            m = r.shape[0]
            post = MixturePosterior(rotations=r, pose_tril=0.01 * torch.eye(3).expand(m, 1, 3, 3).clone(),
                                    weights=torch.ones(m, 1), log_scale_loc=ls_exp[a:a + 64, None],
                                    log_scale_sd=0.1 * torch.ones(m, 1))
            out.append(refine_posterior(model, images[a:a + 64], post, n_refine=1, n_iter=8, pixels=good,
                                        log_intensity=log_intensity).rotations[:, 0].double())
        return torch.cat(out)

    def errors(r: torch.Tensor) -> np.ndarray:
        return rotmat_to_rotvec(r.transpose(-1, -2) @ r_fit).numpy()

    def show(name: str, e: np.ndarray) -> None:
        a = np.degrees(np.linalg.norm(e, axis=-1))
        print(f"{name:44s} median {np.median(a):6.3f} deg  rms {np.sqrt((a ** 2).mean()):7.3f} deg", flush=True)

    e_exp = errors(r_exp)
    show("the export's poses", e_exp)
    e_cube = errors(refine(cached_log_intensity(cube, model.q_max)))
    show(f"true poses refined on the field's cube ({n_grid}^3)", e_cube)
    if args.field:
        show("true poses refined on the field", errors(refine(None)))
    mol = load_structure(args.structure)
    g32 = torch.as_tensor(g, dtype=torch.float32)
    ball = lambda m: (np.stack(np.meshgrid(*[np.linspace(-1, 1, m)] * 3, indexing="ij")) ** 2).sum(0) <= 1
    level = float(np.exp(cube[0, 0].numpy()[ball(n_grid)]).mean())
    for m in (n_grid, min(2 * (n_grid - 1) + 1, 321)):
        intensity = intensity_from_transform(transform_on_grid(mol, m, model.q_max)[0])
        intensity = intensity * (level / intensity[ball(m)].mean())  # the field's overall level
        log_true = torch.as_tensor(np.log(np.maximum(intensity, intensity[intensity > 0].min())),
                                   dtype=torch.float32)[None, None]
        read = cached_log_intensity(log_true, model.q_max)
        show(f"true poses refined on the true intensity ({m}^3)", errors(refine(lambda x: read(x @ g32.to(x.dtype).T))))
    ok = np.degrees(np.linalg.norm(e_exp, axis=-1)) < 10
    cos = float((e_exp[ok] * e_cube[ok]).sum() / np.sqrt((e_exp[ok] ** 2).sum() * (e_cube[ok] ** 2).sum()))
    share, eig = stretch_share(e_cube, r_fit.numpy())
    print(f"cosine of the export's errors with the field's ({ok.sum()} patterns within 10 deg): {cos:.3f}")
    print(f"share of the field's pose errors a linear stretch explains: {share:.3f} (trace-free eigenvalues "
          f"{', '.join(f'{x:+.4f}' for x in eig)})")
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
