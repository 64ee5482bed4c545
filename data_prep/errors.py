"""The one exception type for bad input; the CLIs print it as `error: <msg>` and exit 2."""


class DataError(Exception):
    """Bad input data, paths or settings. The message is one line naming the file, path or value."""
