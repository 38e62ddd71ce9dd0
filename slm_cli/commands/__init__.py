"""One thin Hydra entry point per `slm` subcommand; the work happens in the components."""

CONFIG_PATH = "pkg://slm_cli.conf"
VERSION_BASE = "1.3"
