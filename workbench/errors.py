"""One exception type for every problem a user can fix.

Raise `WorkbenchError("what is wrong; how to fix it")` for bad input. The CLI prints it as a single line
(`error: ...`) with exit status 2 and no traceback; notebooks show the same sentence.
"""


class WorkbenchError(Exception):
    """A user-facing error: the message names the problem and the fix, in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class NotebookError(WorkbenchError):
    """A user-facing error raised inside a notebook: IPython shows it as this one line, without a traceback."""

    def _render_traceback_(self) -> list[str]:  # IPython prints these lines instead of the traceback
        return [f"{type(self).__name__}: {self}"]


class ParameterError(NotebookError):
    """A notebook parameter is unknown or ill-typed."""


class StudyError(NotebookError):
    """A study cannot proceed (no source study, no meta-trained phi, cells that did not finish ...)."""
