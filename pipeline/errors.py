"""Errors a user can fix: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input, missing files or an unreachable service; the message says which."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """An error's first line (its type when it says nothing), cut at a word within `limit`."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def os_error_text(err: OSError) -> str:
    """`[Errno 28] No space left on device: 'x'` -> `no space left on device: x`."""
    what = (err.strerror or str(err)).lower()
    return f"{what}: {err.filename}" if err.filename else what


class ParamsError(UserError):
    """A params.yaml key is unknown, of the wrong type or out of range."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message
