"""Experiment tooling built on :mod:`tnkd.training`.

Side-by-side comparisons (``tnkd compare``), whole grids (``tnkd grid``), results tables and
plots (``tnkd report``) and per-epoch progress lines. Nothing in the library (students,
divergences, training) imports from here.
"""
