"""One thin Hydra entry point per `slm` subcommand; the work happens in the components."""

from slm_cli.data.corpora import register_resolvers
from slm_cli.loggers import register_resolvers as register_logger_resolvers

register_resolvers()  # ${corpus:NAME} in configs: a vendored corpus file (slm_cli/data/corpora.py)
register_logger_resolvers()  # W&B run ids, names and groups (slm_cli/loggers.py)

CONFIG_PATH = "pkg://slm_cli.conf"
VERSION_BASE = "1.3"

# The environment variable holding how this process was started (sys.argv[0] before `slm` rewrites it
# for Hydra), set by slm_cli/__main__.py: Lightning starts the other ranks of a local multi-device run
# with the same program (slm_cli.commands.launch.local_launch).
PROGRAM_ENV = "SLM_PROGRAM"
