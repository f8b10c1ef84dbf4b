"""The one exception the leaf raises for bad input, so it needs nothing above it.

``tvswitch.errors.TvswitchError`` lives above this package (docs/architecture.md, Imports: jetson is a
leaf), so the CLI verbs that call into jetson translate this into it: one line on
stderr and exit code 2. It subclasses ValueError so that library callers who catch
ValueError for bad arguments keep working.
"""


class JetsonInputError(ValueError):
    """A root folder, device key or bundle figure that cannot describe a deployment."""
