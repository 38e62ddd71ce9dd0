"""The Hydra config tree, shipped as the package `slm_cli.conf` (see pyproject.toml)."""
