"""The one exception type users see for bad input, configuration or files."""


class AsdError(ValueError):
    """A problem with the user's data, files or configuration.

    The message always names the offending file or key and says how to fix it, so
    entry points can print it as one line instead of a traceback.
    """
