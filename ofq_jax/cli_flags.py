"""Command-line flags of the ``--config`` CLIs (``ofq_jax.main``, ``ofq_jax.plan``): a bad
config argument or override is one ``error: ...`` line and exit status 2, not a trace."""

from __future__ import annotations

import re
import sys

from absl import flags

from ofq_jax.errors import one_line

FLAGS = flags.FLAGS


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a bad ``--config`` argument or override as one line (exit 2)."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError) as error:
    print(_flag_error_line(error, argv), file=sys.stderr, flush=True)
    sys.exit(2)


def _flag_error_line(error: BaseException, argv: list[str]) -> str:
  text = str(error)
  marker = "UserError: "  # config_flags keeps only the text of the config file's error
  if marker in text:
    return one_line(text[text.rindex(marker) + len(marker):])
  if isinstance(error, (AttributeError, KeyError)):  # ConfigDict: an override's unknown key
    text = text.replace("\\n", " ").replace("\\'", "'")  # the repr of a KeyError
    words = re.findall(r"Did you mean [^?]*\?|[\w.]+", text)
    key = words[0] if words else "?"
    flag = next((a.split("=")[0] for a in argv[1:]
                 if a.split("=")[0].startswith("--config.") and
                 a.split("=")[0].endswith("." + key)), "--config.*")
    hint = next((w for w in words if w.startswith("Did you mean")), "")
    return one_line(f"{flag}: the config has no key {key!r}. {hint} (the keys are the "
                    "fields of the config file's get_config(); docs/training.md shows how to "
                    "print them)")
  return one_line(text)
