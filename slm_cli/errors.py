"""User-facing errors.

Every problem the user can fix (bad config value, missing file, mismatched artefacts) is raised as
:class:`SlmError` with a message that names the problem *and* the fix. The CLI prints it as one line
and exits non-zero; ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""


class SlmError(Exception):
    """A problem in the user's input, reported as one line without a traceback."""
