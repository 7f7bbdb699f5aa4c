"""The one error for bad training data, so callers catch it the same way whichever module found it."""

from __future__ import annotations

from mzoo.errors import UserError


class DataError(UserError):
    """Input data, a dataset on disk, a tokenizer or a finetuning file is missing or unusable; the
    message names it and says what to do."""
