"""A mistake in what the user asked for, as opposed to a bug.

The command lines print these as one ``error: ...`` line (naming the key, the value
and the fix) and exit with status 2; anything else keeps its traceback.
"""


class UserError(ValueError):
  """A bad config value, argument or combination of them."""


class MissingInputError(UserError, FileNotFoundError):
  """A file or directory the config points at (or the run needs) does not exist."""


class DivergedError(UserError, FloatingPointError):
  """The loss left the floats; the message names the step, the checkpoint kept and the
  settings to change (a traceback would point at the loop, not at the cause)."""


def one_line(error: BaseException) -> str:
  """``error: <message>`` on one line (a message's own ``error:`` prefix dropped)."""
  text = " ".join(str(error).split())
  return text if text.startswith("error: ") else f"error: {text}"
