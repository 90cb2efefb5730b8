"""One error family for everything a user can get wrong.

Nodes turn a `UserInputError` into a node error whose text is shown as is, so every message
says what is wrong, where (file, folder, parameter) and the fix.
"""


class UserInputError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


class TrainingStopped(RuntimeError):
    """Training ended early on purpose (cancel) or because it could not go on (non-finite loss)."""
