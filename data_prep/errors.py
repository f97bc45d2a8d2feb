"""The one exception a user of data_prep is meant to see."""

from __future__ import annotations


class DataError(Exception):
    """A data problem the user can fix: missing files, bad corpora, corrupt shards, mismatched settings.

    The message is a single line that names the file (or option) at fault and says how to fix it; the CLI
    prints it as `error: <message>` and exits with code 2 instead of showing a traceback.
    """
