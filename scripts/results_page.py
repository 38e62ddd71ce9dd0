"""Write docs/results.md from the runs of scripts/reproduce_small.sh: a thin driver of
`python -m slm_cli.report.results ROOT RESULTS.md [--keep K] [--command "..."]`
(slm_cli/report/results.py, docs/report.md)."""

from slm_cli.report.results import main

if __name__ == "__main__":
    main()
