"""The report of a fit (kept importable here; the fit workflow calls :func:`bayes_spi.report.page.write_report`).

The implementation lives in :mod:`bayes_spi.report`: figures in ``RUN/report/*.png``, the page
``RUN/report.html`` (returned) and the one-page overview ``RUN/report.png``.

Example::

    write_report("run1", truth_path="data.h5")   # -> Path("run1/report.html")
"""

from __future__ import annotations

from bayes_spi.report.page import write_report

__all__ = ["write_report"]
