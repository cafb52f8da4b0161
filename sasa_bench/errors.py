"""One exception type for every user-facing mistake.

The CLI turns a :class:`SasaError` into a single line on stderr and exit code 2, so any module
can reject bad input without knowing how it is reported.
"""


class SasaError(ValueError):
    """Bad input from the user (options, files, data): reported as one line, exit code 2."""
