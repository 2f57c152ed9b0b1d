"""What the entry scripts run: the Lightning CLI (`lab/cli.py`, train.py's), an experiment's file, runs and report
(`lab/experiment.py`, `lab/runner.py`, `lab/report.py`, compare.py's) and the future-lens probe
(`lab/future_lens.py`). It may import every library room; none of them imports it."""
