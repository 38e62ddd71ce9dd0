"""User-facing errors.

Every problem the user can fix (bad config value, missing file, mismatched artefacts) is raised as
:class:`SlmError` with a message that names the problem *and* the fix. The CLI prints it as one line
and exits non-zero; ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""


class SlmError(Exception):
    """A problem in the user's input, reported as one line without a traceback."""


class JobFailed(BaseException):
    """Carries a job's exception past Hydra to the `slm` entry point.

    Hydra catches ``Exception`` inside a job and prints its own multi-line report before re-raising;
    wrapping the error in a ``BaseException`` lets it pass untouched, so `slm` prints one line.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def report_errors(task):  # type: ignore[no-untyped-def]
    """Decorator for a Hydra task function: re-raise its exceptions as :class:`JobFailed`."""
    import functools
    import os

    @functools.wraps(task)
    def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return task(*args, **kwargs)
        except Exception as exc:
            if os.environ.get("SUBMITIT_FOLDER"):
                # A SLURM job of hydra/launcher=slurm: submitit records only an Exception as the
                # job's outcome (anything else leaves `slm train -m` waiting for a result), and
                # hands it to the `slm` process that submitted the job, which prints one line.
                raise
            raise JobFailed(exc) from exc

    return wrapped
