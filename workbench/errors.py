"""One exception type for every problem a user can fix.

Raise `WorkbenchError("what is wrong; how to fix it")` for bad input. The CLI prints it as a single line
(`error: ...`) with exit status 2 and no traceback; notebooks show the same sentence.
"""


class WorkbenchError(Exception):
    """A user-facing error: the message names the problem and the fix, in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
