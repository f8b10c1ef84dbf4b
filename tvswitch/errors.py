"""The one exception type that the CLI turns into a one-line message and exit code 2.

Every layer raises it for bad input (a file, tensor, flag or bundle the user gave us),
so that a caller can tell the user's mistake from a bug in tvswitch.
"""


class TvswitchError(Exception):
    """Bad input: the message names the file, tensor or flag at fault."""


class BundleError(TvswitchError):
    """A bundle is corrupt, of another version, or does not match the base it is used with."""
