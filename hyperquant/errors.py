class HyperquantError(Exception):
    """A user-facing problem: the message names the problem and the fix. The CLI prints it on one line."""
