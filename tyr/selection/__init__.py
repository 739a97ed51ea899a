"""Pick a deployable model from recorded measurements: quality against speed-up, Pareto front, targets.

- selection.py: Measurement, Targets and select(), pure functions on recorded numbers
- candidates.py: read measurements and benchmark results from files into Measurements
- report.py: selection.json, candidates.csv, report.html and the terminal table
- cli.py: `tyr select`
"""
