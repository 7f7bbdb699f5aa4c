"""The one exception family for mistakes a user can make: the CLI prints the sentence, exits 2."""


class UserError(ValueError):
    """Bad input: the message is one sentence saying what is wrong and how to fix it."""
