"""Small real text corpora vendored with slm, shipped as the package `slm_cli.corpora`.

Configs name a file here with `${corpus:<folder>/<file>}` (see slm_cli/data/corpora.py and
README.md beside this file for sources and licences).
"""
