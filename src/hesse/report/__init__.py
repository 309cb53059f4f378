"""Reports: the curvature analysis of a model as a result object that saves, loads, prints,
plots and compares (the library side of ``hesse analyze``, ``hesse plot``, ``hesse compare``).
"""

from ._analyze import SCHEMA_VERSION, STAGES, AnalysisReport, TrackerHistory, analyze, load_report
from .compare import compare_reports, comparison_markdown

__all__ = [
    "SCHEMA_VERSION",
    "STAGES",
    "AnalysisReport",
    "TrackerHistory",
    "analyze",
    "compare_reports",
    "comparison_markdown",
    "load_report",
]
