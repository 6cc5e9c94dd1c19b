"""The one exception type users see. Its message is a single line: what is wrong, what to do."""


class EdgegenError(Exception):
    """A problem the user can fix (bad path, mismatched pair, corrupt file, bad option)."""
