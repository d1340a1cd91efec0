"""Simulate the packaged 2CEX molecule, reconstruct it, and report how well it worked.

Writes OUT/data.h5 (reference-32 detector, about 1e4 photons per pattern, artifacts FPB: lognormal
fluence jitter 0.3, Poisson noise, a 2-pixel beam stop; reused when it already holds the same
simulation), then fits it into OUT (offline SVI, settings from DEMO_CONFIG in bayes_spi/cli/demo.py;
an earlier demo run in OUT is replaced), writes the outputs of `bayes-spi fit`, evaluates them against
the truth and ends with the median orientation error (after the best global rotation; a mirror of the
molecule is a rotation of its intensity, so this allows for inversion), also modulo the Rz(pi)
ambiguity, the intensity correlation and the FSC resolutions (intensity, speckle, density). It then
phases the reconstructed intensity into OUT/density.mrc and writes the report (OUT/report.html with the
figures in OUT/report/). --quick runs a tiny version (a few hundred patterns, seconds) for testing.

Example: bayes-spi demo --out demo_run
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

__all__ = ["command", "DEMO_CONFIG", "QUICK_CONFIG", "demo_settings"]

#: The demo's simulation and fit settings (``fit``: FitConfig fields). Tune here.
DEMO_CONFIG: dict[str, Any] = {
    "structure": "2CEX",
    "geometry": "reference-32",
    "n_patterns": 16000,
    "mean_photons": 1e4,
    "artifacts": "FPB",
    "fluence_jitter": "lognormal:0.3",
    "beamstop_radius": 2.0,
    "truth_grid": 33,
    "sim_seed": 0,
    "grid": 65,
    "phase_starts": 4,
    "fit": {
        "online": False,
        "epochs": 4,
        "batch_size": 32,
        "seed": 0,
        # no time budget: the schedule is sized by images, so a slower machine takes longer but reaches the
        # same result (a wall-clock stop made the demo worse on a busy machine)
    },
}

#: ``--quick``: overrides of DEMO_CONFIG for a tiny run (tests, smoke checks)
QUICK_CONFIG: dict[str, Any] = {
    "n_patterns": 256,
    "truth_grid": 17,
    "grid": 17,
    "phase_starts": 1,
    "fit": {
        "epochs": 1,
        "batch_size": 32,
        "field_width": 16,
        "n_heads": 1,
        "n_search": 1,
        "search_rotations": 256,
        "pixels_per_pattern": 64,
        "encoder_features": 32,
        "encoder_channels": 8,
        "log_every": 2,
        "checkpoint_every": 4,
    },
}


def demo_settings(quick: bool = False, n_patterns: int | None = None) -> dict[str, Any]:
    """DEMO_CONFIG, with QUICK_CONFIG applied for ``quick`` and ``n_patterns`` if given (a new dict)."""
    settings = {**DEMO_CONFIG, "fit": dict(DEMO_CONFIG["fit"])}
    if quick:
        settings.update({k: v for k, v in QUICK_CONFIG.items() if k != "fit"})
        settings["fit"].update(QUICK_CONFIG["fit"])
    if n_patterns is not None:
        settings["n_patterns"] = int(n_patterns)
    return settings


def _simulation_matches(path: Path, s: dict[str, Any]) -> bool:
    """Whether ``path`` already holds this simulation (valid file, same recorded settings)."""
    from bayes_spi.dataio.h5 import DataFormatError, SPIDataset

    if not path.is_file():
        return False
    try:
        with SPIDataset(path) as ds:
            a = ds.attrs
            return (ds.n_patterns == s["n_patterns"] and ds.geometry.name == s["geometry"]
                    and str(a.get("structure")) == s["structure"] and int(a.get("seed", -1)) == s["sim_seed"]
                    and str(a.get("artifacts")) == s["artifacts"]
                    and int(a.get("truth_grid", -1)) == s["truth_grid"]
                    and float(a.get("mean_photons_target", -1.0)) == float(s["mean_photons"])
                    and str(a.get("fluence_jitter")) == s["fluence_jitter"])
    except (DataFormatError, OSError, ValueError, TypeError):
        return False


@click.command(name="demo", help=__doc__)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_run"),
              show_default=True, help="Output directory (data.h5 and the run).")
@click.option("--n-patterns", type=click.IntRange(min=2), default=None,
              help=f"Patterns to simulate [default: {DEMO_CONFIG['n_patterns']}, "
                   f"--quick: {QUICK_CONFIG['n_patterns']}].")
@click.option("--quick", is_flag=True, help="A tiny run for testing.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def command(out: Path, n_patterns: int | None, quick: bool, progress: bool) -> None:
    from bayes_spi.cli.fit import print_summary, run_fit
    from bayes_spi.sim.simulate import simulate

    s = demo_settings(quick, n_patterns)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data.h5"
    if _simulation_matches(data, s):
        click.echo(f"reusing {data} ({s['n_patterns']} patterns)")
    else:
        click.echo(f"simulating {s['n_patterns']} patterns of {s['structure']} on {s['geometry']} -> {data}")
        try:
            simulate(s["structure"], s["geometry"], s["n_patterns"], data, artifacts=s["artifacts"],
                     mean_photons=s["mean_photons"], fluence_jitter=s["fluence_jitter"],
                     beamstop_radius=s["beamstop_radius"], seed=s["sim_seed"], truth_grid=s["truth_grid"],
                     progress=progress)
        except (FileNotFoundError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
    argv = ["bayes-spi", "demo", "--out", str(out)] + (["--quick"] if quick else []) + (
        ["--n-patterns", str(n_patterns)] if n_patterns is not None else [])
    result = run_fit(data, out, dict(s["fit"]), force=True, grid=s["grid"], truth=True, progress=progress,
                     argv=argv)
    print_summary(result)
    ev = result["evaluation"]
    if ev is None:
        raise click.ClickException(f"{data}: no truth to evaluate against (expected a simulated file)")
    click.echo("")
    verdict = result["verdict"]
    if verdict.status != "converged":
        what = ("FAILED: the numbers below describe a failed reconstruction, not a result"
                if verdict.status == "failed" else
                "DID NOT CONVERGE: the numbers below describe an unfinished reconstruction (run longer)")
        click.echo(f"THE DEMO FIT {what}:", err=True)
        for reason in verdict.reasons:
            click.echo(f"  - {reason}", err=True)
    click.echo(f"median orientation error: {ev['median_pose_error_deg']:.2f} deg "
               "(best global rotation; inversion included, Friedel)")
    click.echo(f"median orientation error mod Rz(pi): {ev['median_pose_error_mod_rotz_deg']:.2f} deg "
               f"(wrong-mode fraction {ev['wrong_mode_fraction']:.2f})")
    click.echo(f"intensity correlation: {ev['intensity_corr']:.4f} (log intensity: {ev['log_intensity_corr']:.4f})")
    click.echo(f"FSC resolution (nm) at 0.5 / 0.143: intensity {ev['intensity_fsc_res_nm_0.5']:.2f} / "
               f"{ev['intensity_fsc_res_nm_0.143']:.2f}, speckle {ev['speckle_fsc_res_nm_0.5']:.2f} / "
               f"{ev['speckle_fsc_res_nm_0.143']:.2f}, density {ev['density_fsc_res_nm_0.5']:.2f} / "
               f"{ev['density_fsc_res_nm_0.143']:.2f} (detector corner {ev['corner_res_nm']:.2f})")
    # the electron density of the reconstruction, and the report again so it shows the density
    from bayes_spi.cli.phase import run_phase
    from bayes_spi.infer.report import write_report
    from bayes_spi.infer.rundir import RunDir

    rec = run_phase(out, starts=s["phase_starts"], progress=False)
    page = write_report(out, data)
    click.echo(f"density: {rec['out']} (best of {rec['starts']} phasing starts); report: {page}")
    if verdict.status == "failed" and not quick:  # --quick is a smoke test: too short to converge
        raise click.ClickException(f"the demo fit failed its truth-free verdict ({RunDir(out).path('verdict')})")
