"""Sanity check of a converted Dragonfly file: mean photon pattern vs ppui * Omega * P * <I>(|q|); the x/y wedge ratio
tests the axis mapping (polarization "x" lowers the x wedge). Usage: python check_polarization.py FILE.h5"""
import sys, numpy as np
from bayes_spi.dataio.h5 import SPIDataset
with SPIDataset(sys.argv[1]) as ds:
    g = ds.geometry
    tot = np.zeros(g.shape)
    for s in range(0, ds.n_patterns, 2000):
        tot += ds.read(slice(s, min(ds.n_patterns, s+2000))).sum(0)
    mean = tot / ds.n_patterns
    I, dq = ds.truth_intensity(); ppui = ds.photons_per_unit_intensity
q = g.q_vectors(); qm = np.linalg.norm(q, axis=-1)
# spherical average of truth vs |q|
n = I.shape[0]; a = np.arange(n) - n//2
r = np.sqrt(a[:,None,None]**2 + a[None,:,None]**2 + a[None,None,:]**2).ravel()
sh = np.floor(r+0.5).astype(int); prof = np.bincount(sh, I.ravel())/np.bincount(sh)
pred = ppui * g.solid_angle() * g.polarization_factor() * np.interp(qm/dq, np.arange(len(prof)), prof)
good = g.good_pixels()
pos = g.pixel_positions(); u, v = pos[...,0], pos[...,1]
ring = good & (qm > 0.6*qm.max()) 
wx = ring & (np.abs(u) > 2*np.abs(v)); wy = ring & (np.abs(v) > 2*np.abs(u))
print("obs mean photons/frame", mean[good].sum(), "pred", pred[good].sum())
print("x-wedge/y-wedge obs %.4f pred %.4f" % (mean[wx].sum()/mean[wy].sum(), pred[wx].sum()/pred[wy].sum()))
print("corr(obs,pred) log over good", np.corrcoef(np.log(mean[good]+1e-9), np.log(pred[good]+1e-9))[0,1])
