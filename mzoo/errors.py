"""The one exception family for mistakes a user can make: the CLI prints the sentence, exits 2."""


class UserError(Exception):
    """Bad input: the message is one sentence saying what is wrong and how to fix it.

    Not a ValueError: code that catches ValueError (bad numbers, bad JSON) must not swallow a user's
    mistake by accident."""
