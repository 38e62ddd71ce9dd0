"""One thin Hydra entry point per `slm` subcommand; the work happens in the components."""

CONFIG_PATH = "pkg://slm_cli.conf"
VERSION_BASE = "1.3"

# How this process was started (sys.argv[0] before `slm` rewrites it for Hydra): Lightning starts the
# other ranks of a local multi-device run with the same program (slm_cli.parallel.local_launch).
PROGRAM = ""
