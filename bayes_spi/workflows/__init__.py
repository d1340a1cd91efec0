"""Workflows: what a command does from its inputs to a complete run directory, callable from Python.

The command line (:mod:`bayes_spi.cli`) only parses options and calls these; a Python user who calls them
gets the same run directory (``config.yaml``, ``run.log``, the lock, every output) as ``bayes-spi``.

- :mod:`bayes_spi.workflows.fit`: :func:`~bayes_spi.workflows.fit.run_fit` (one fit: resume policy, the
  run's files, the verdict, the evaluation against the truth, the report) and
  :func:`~bayes_spi.workflows.fit.run_halfsets` (two fits on a random split and their FSC).
- :mod:`bayes_spi.workflows.checks`: checks made before anything is written (device, output directory).
- :mod:`bayes_spi.workflows.errors`: :class:`~bayes_spi.workflows.errors.WorkflowError`, the one error a
  workflow raises for a bad input or a failed write.
"""

__all__: list[str] = []
