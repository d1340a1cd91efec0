"""The run report: PNG figures of a fit and one HTML page that shows them (``bayes-spi report RUN/``).

- :mod:`bayes_spi.report.numbers`: the numbers behind the figures (pure, tested functions);
- :mod:`bayes_spi.report.rundata`: lazy, validated reading of the run directory, data file and truth;
- :mod:`bayes_spi.report.figures`: one function per figure;
- :mod:`bayes_spi.report.page`: ``RUN/report.html`` and :func:`write_report`.

Example::

    from bayes_spi.report import write_report
    write_report("run1", truth_path="data.h5")   # -> run1/report.html
"""

from bayes_spi.report.page import FIGURES, REPORT_DIR, ReportResult, build_report, write_report

__all__ = ["FIGURES", "REPORT_DIR", "ReportResult", "build_report", "write_report"]
