"""The one exception type users see: a single line naming the source and the fix; and the one
line that stands for any other exception where a step or a command ends."""

import errno

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


# What to do about an OSError, by its code (the rest say what happened and where only); the
# second text for an error that names no path (a write to an open file: disk full).
_OS_FIXES = {
    errno.ENOSPC: ("free space on that disk", "free space where the step writes (outputs, TMPDIR)"),
    errno.EDQUOT: ("free space or raise the quota", "free space or raise the quota"),
    errno.EACCES: ("check the permissions of that path", "check the permissions"),
    errno.EPERM: ("check the permissions of that path", "check the permissions"),
    errno.EROFS: ("that file system is read-only: write elsewhere", "write to a writable disk"),
    errno.ENOENT: ("check the path", "check the paths"),
}
_LONGEST = 400  # characters of a foreign exception's message kept in the one line


def describe(exc: BaseException) -> str:
    """One line for any exception: an SftpipeError's own message; for an OSError the path it
    names, what happened and what to do; else the type and the first characters of its text."""
    if isinstance(exc, SftpipeError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = "" if exc.filename is None else str(exc.filename)
        if exc.filename2 is not None:
            where += f" -> {exc.filename2}"
        problem = f"{exc.strerror} ({type(exc).__name__}, errno {exc.errno})"
        with_path, without = _OS_FIXES.get(exc.errno or 0, ("", ""))
        return str(SftpipeError(where, problem, with_path if where else without))
    text = " ".join(str(exc).split())
    if len(text) > _LONGEST:
        text = text[:_LONGEST] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
