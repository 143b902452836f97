"""The one exception type users see: a single line naming the source and the fix."""

# Set by `sftpipe run`: a failing step also writes its one-line error to this file, so the CLI
# can end with it (KFP's local runner only says which task failed).
ERROR_FILE_ENV = "SFTPIPE_ERROR_FILE"


class SftpipeError(Exception):
    """A user-facing error. Its message is one line: what is wrong, where, and what to do.

    The CLI and the KFP components print it without a traceback.
    """

    def __init__(self, where: str, problem: str, fix: str = "") -> None:
        self.where, self.problem, self.fix = where, problem, fix
        message = f"{where}: {problem}" if where else problem
        if fix:
            message += f" ({fix})"
        # One line, always: wrapped library messages may span several.
        super().__init__(" ".join(message.split()))
