"""Reports over finished (and running) training runs: `slm report` (build.py) and the pieces it is
made of, for other reports to reuse: run dirs (runs.py), tables (table.py), plots (plots.py), the
self-contained HTML page (html.py) and the output folder written as one (folder.py)."""
