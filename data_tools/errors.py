"""The exception that data_tools' library code raises for user errors."""

from __future__ import annotations


class BuildError(ValueError):
    """A user error (an impossible option, an unreadable source, too many rejected rows, ...).

    Its message is one line that names the input and the fix. Library code raises it and never
    exits the process; `python -m data_tools` prints it as `data_tools: error: ...` and exits 1.
    A `ValueError`, so callers that already treat `ValueError` as bad input keep working.
    """
