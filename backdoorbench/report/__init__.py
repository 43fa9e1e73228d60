"""``python -m backdoorbench report``: one run's results, and tables over many runs.

- :mod:`~backdoorbench.report.runs`: printing one run; ``write_report`` (summary, per-run table, the tables below)
- :mod:`~backdoorbench.report.tables`: attacks × detectors and attacks × repair / training-time defenses
- :mod:`~backdoorbench.report.seeds`: the same per seed, with mean ± std and paired differences from unrounded values
- :mod:`~backdoorbench.report.roc`: ROC figures from the runs' ``scores.csv``
- :mod:`~backdoorbench.report.zoo`: model inspection over a zoo of clean and backdoored victims (model-level AUROC)
- :mod:`~backdoorbench.report.reference`: published figures beside ours (``report --reference``)
- :mod:`~backdoorbench.report.blocks`: the docs' generated tables (``report --update-docs`` / ``--check-docs``)
"""

from backdoorbench.report.fmt import bold_lowest, pct
from backdoorbench.report.roc import roc_figure
from backdoorbench.report.runs import COLUMNS, RATES, collect, print_run_summary, rows, write_report
from backdoorbench.report.tables import write_comparison, write_defended_comparison

__all__ = [
    "COLUMNS", "RATES", "bold_lowest", "collect", "pct", "print_run_summary", "roc_figure", "rows",
    "write_comparison", "write_defended_comparison", "write_report",
]
