"""Docs that stay true: what ``tests/integration/test_docs.py`` checks in README.md and docs/.

A page is Markdown. Its fenced blocks carry a language: ``python`` and ``bash`` blocks
run (from the repository root, in page order), ``text`` and ``json`` blocks are output
and are not run; an untagged fence is an error. HTML comments on the lines right before
a fence direct how its block runs:

  <!-- docs: needs WHAT -->          not run; WHAT says what it needs (ImageNet, a TPU
                                     pod, a released checkpoint, minutes of CPU, ...)
  <!-- docs: replace "OLD" "NEW" --> run with OLD replaced by NEW (shell-quoted), e.g.
                                     to shrink a training run to a few steps
  <!-- docs: continues -->           a python block that continues the page's previous
                                     python block: they run as one script
  <!-- docs: tiny -->                every ``--config=configs/digits.py[:args]`` of the block
                                     gets ``TINY`` (or ``TINY_SWIN`` for ``arch=swin``)
                                     appended: a 2-block model, 3 steps per stage
  <!-- docs: readers MODULE -->      every repository file named in the next paragraph
                                     (or table) imports MODULE (a claim about who reads it)

``/tmp/`` in a run block becomes one fresh folder, shared by every page's blocks (they
run page after page, so a page may resume what an earlier one trained with the same
command; each page also runs alone). Static
checks (no block runs): relative links and their anchors, repository paths named in the
text (``path::test`` names a test in that file), ``--config.<key>`` against the config on
the same command (in prose: against any of the repository's configs),
``configs/F.py:key=a|b`` listing exactly the choices the config accepts, dotted
``ofq_jax.*`` names, ``python -m ofq_jax.<module>`` naming a module (the test runs its
``--help``).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib
import importlib.util
import pathlib
import re
import os
import shlex
import subprocess
import sys

from support.runs import SWIN_TINY_OVERRIDES, TINY_OVERRIDES

REPO = pathlib.Path(__file__).resolve().parents[2]
RUN_LANGUAGES = ("python", "bash")
LANGUAGES = RUN_LANGUAGES + ("text", "json")
TOP_DIRS = ("ofq_jax", "configs", "tests", "bench", "docs", "colabs", ".ci")
CONFIG_FILES = {"digits": ("", "arch=swin", "method=lsq"),
                "imagenet": ("", "model=swin_t", "stage=cga"),
                "deit_model": ("",)}
"""Every config file with the argument strings whose keys prose may name."""

_ONE_SAVE = {"checkpoint_every_steps": 1000}  # a save per step costs seconds; a page needs none
TINY = " ".join(shlex.quote(f"--config.{k}={v}") for k, v in
                {**TINY_OVERRIDES, **_ONE_SAVE}.items())
TINY_SWIN = " ".join(shlex.quote(f"--config.{k}={v}".replace(" ", "")) for k, v in
                     {**SWIN_TINY_OVERRIDES, **_ONE_SAVE, "plots": False}.items())
"""What ``<!-- docs: tiny -->`` appends: the integration tests' tiny digits runs (their
compiled steps are shared through the session's compilation cache), saving at the end."""

_FENCE = re.compile(r"^(\s*)```(.*)$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*docs:\s*(\w+)\s*(.*?)\s*-->\s*$")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_PATH = re.compile(r"(?<![\w./<{$-])((?:" + "|".join(re.escape(d) for d in TOP_DIRS)
                   + r")/[\w./*-]*)(::\w+)?")
_CONFIG_KEY = re.compile(r"--config\.([A-Za-z_][\w.]*)")
_CONFIG_FILE = re.compile(r"--config=(configs/(\w+)\.py)(?::([^\s`'\"\\]+))?")
_CONFIG_CHOICES = re.compile(r"configs/(\w+)\.py:([\w=|,.]+)")
_MODULE = re.compile(r"python -m (ofq_jax(?:\.\w+)+)")
_DOTTED = re.compile(r"`[^`]*?\b(ofq_jax(?:\.\w+)+)")
_TINY_TARGET = re.compile(r"--config=configs/digits\.py(:\S*)?")
_INLINE_CODE = re.compile(r"`([^`\n]+)`")


@dataclasses.dataclass
class Block:
  language: str
  code: str
  line: int
  needs: str = ""
  replace: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  continues: bool = False
  tiny: bool = False


@dataclasses.dataclass
class Page:
  path: pathlib.Path
  blocks: list[Block]
  prose: list[tuple[int, str]]  # (line number, line) outside fenced blocks
  problems: list[str]  # found while parsing

  @property
  def name(self) -> str:
    return str(self.path.relative_to(REPO))


def pages() -> list[pathlib.Path]:
  """README.md, every guide in docs/, BENCHMARKS.md and RESULTS.md."""
  return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
          REPO / "BENCHMARKS.md", REPO / "RESULTS.md"]


def parse(path: pathlib.Path, text: str | None = None) -> Page:
  """Splits a page into blocks (with their directives) and prose lines."""
  lines = (path.read_text() if text is None else text).splitlines()
  page = Page(path, [], [], [])
  pending: dict = {"replace": []}
  i = 0
  while i < len(lines):
    line = lines[i]
    fence = _FENCE.match(line)
    directive = _DIRECTIVE.match(line)
    if directive:
      kind, arg = directive.groups()
      if kind == "needs" and arg:
        pending["needs"] = arg
      elif kind == "continues":
        pending["continues"] = True
      elif kind == "tiny":
        pending["tiny"] = True
      elif kind == "replace" and len(shlex.split(arg)) == 2:
        pending["replace"].append(tuple(shlex.split(arg)))
      elif kind == "readers" and arg:
        pending["readers"] = arg
      else:
        page.problems.append(f"{path.name}:{i + 1}: bad directive {line.strip()!r}")
      page.prose.append((i + 1, ""))
      i += 1
      continue
    if not fence:
      if line.strip() and "readers" in pending:
        readers_of(page, i + 1, pending.pop("readers"), lines[i:])
      page.prose.append((i + 1, line))
      if line.strip():
        pending = {"replace": []}
      i += 1
      continue
    indent, language = fence.group(1), fence.group(2).strip()
    start, body = i + 1, []
    i += 1
    while i < len(lines) and not lines[i].strip().startswith("```"):
      body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
      i += 1
    i += 1
    if language not in LANGUAGES:
      page.problems.append(f"{path.name}:{start}: a fenced block needs a language "
                           f"({', '.join(LANGUAGES)}), not {language!r}")
    page.blocks.append(Block(language, "\n".join(body) + "\n", start,
                             pending.get("needs", ""), pending["replace"],
                             pending.get("continues", False), pending.get("tiny", False)))
    pending = {"replace": []}
  return page


def readers_of(page: Page, line: int, module: str, rest: list[str]) -> None:
  """Checks a ``readers`` claim: each file the paragraph names imports ``module``."""
  paragraph = []
  for text in rest:
    if not text.strip():
      break
    paragraph.append(text)
  named = [m.group(1) for m in _PATH.finditer("\n".join(paragraph)) if m.group(1).endswith(".py")]
  if not named:
    page.problems.append(f"{page.path.name}:{line}: 'readers {module}' names no file")
  package, _, leaf = module.rpartition(".")
  pattern = re.compile(rf"(import {re.escape(module)}\b|from {re.escape(package)} import "
                       rf"([\w, ()]*\b)?{re.escape(leaf)}\b|from {re.escape(module)} import)")
  for name in named:
    file = REPO / name
    if file.exists() and not pattern.search(file.read_text()):
      page.problems.append(f"{page.path.name}:{line}: {name} is named as a reader of "
                           f"{module} but does not import it")


def static_problems(page: Page) -> list[str]:
  """Every check that runs no block."""
  problems = list(page.problems)
  problems += link_problems(page)
  problems += path_problems(page)
  problems += config_problems(page)
  problems += dotted_name_problems(page)
  return list(dict.fromkeys(problems))


def _all_text(page: Page) -> list[tuple[int, str]]:
  out = list(page.prose)
  for block in page.blocks:
    out += [(block.line + 1 + k, line) for k, line in enumerate(block.code.splitlines())]
  return out


@functools.lru_cache(maxsize=None)
def anchors(path: pathlib.Path) -> set[str]:
  """GitHub's heading anchors of a Markdown file."""
  out = set()
  for line in parse(path).prose:
    heading = re.match(r"^#+\s+(.*)$", line[1])
    if heading:
      text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
      out.add(text.replace(" ", "-"))
  return out


def link_problems(page: Page) -> list[str]:
  problems = []
  for number, line in page.prose:
    for target in _LINK.findall(line):
      if re.match(r"^[a-z]+:", target):
        continue
      file, _, anchor = target.partition("#")
      resolved = (page.path.parent / file).resolve() if file else page.path
      where = f"{page.name}:{number}"
      if not resolved.exists():
        problems.append(f"{where}: link {target!r}: {file} does not exist")
      elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        problems.append(f"{where}: link {target!r}: no heading #{anchor} in {file or page.name}")
  return problems


def path_problems(page: Page) -> list[str]:
  problems = []
  for number, line in _all_text(page):
    for match in _PATH.finditer(line):
      name = match.group(1).rstrip(".,;:")
      test = match.group(2)
      where = f"{page.name}:{number}"
      found = glob.glob(str(REPO / name)) if "*" in name else [str(REPO / name)]
      if not found or not pathlib.Path(found[0]).exists():
        problems.append(f"{where}: {name} does not exist")
      elif test and not re.search(rf"def {test[2:]}\b", pathlib.Path(found[0]).read_text()):
        problems.append(f"{where}: {name} has no test {test[2:]}")
  return problems


@functools.lru_cache(maxsize=None)
def load_config(file: str, arg: str = ""):
  """``configs/<file>.py``'s ``get_config(arg)``, loaded once (the checks only read it)."""
  spec = importlib.util.spec_from_file_location(f"docs_{file}_config", REPO / "configs" / f"{file}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def has_key(config, key: str) -> bool:
  node = config
  for part in key.split("."):
    try:
      if part not in node:
        return False
      node = node[part]
    except TypeError:
      return False
  return True


@functools.lru_cache(maxsize=None)
def choices(file: str, key: str) -> frozenset[str]:
  """The values ``configs/<file>.py`` accepts for ``key`` (from its one-line error)."""
  for probe in ("__no_such_value__", "-987654"):  # a string or a number field
    try:
      load_config(file, f"{key}={probe}")
    except Exception as error:  # pylint: disable=broad-except
      listed = re.search(r"is not one of (.*?) \(known", str(error))
      if listed:
        return frozenset(listed.group(1).split(", "))
  return frozenset()


def _commands(page: Page) -> list[tuple[int, str, bool]]:
  """(line, text, is_code): block commands (continuations joined) and prose paragraphs."""
  out = []
  for block in page.blocks:
    joined = block.code.replace("\\\n", " ")
    out += [(block.line, line, True) for line in joined.splitlines()]
  out += [(number, line, False) for number, line in page.prose]
  return out


def config_problems(page: Page) -> list[str]:
  problems = []
  prose_configs = [load_config(f, a) for f, args in CONFIG_FILES.items() for a in args]
  for number, text, is_code in _commands(page):
    where = f"{page.name}:{number}"
    own = _CONFIG_FILE.search(text)
    for key in _CONFIG_KEY.findall(text):
      key = key.rstrip(".")
      if own and is_code:
        config = load_config(own.group(2), own.group(3) or "")
        if not has_key(config, key):
          problems.append(f"{where}: --config.{key} is not a key of {own.group(1)}"
                          f"{':' + own.group(3) if own.group(3) else ''}")
      elif not any(has_key(c, key) for c in prose_configs):
        problems.append(f"{where}: --config.{key} is a key of none of the configs")
    for file, arg in _CONFIG_CHOICES.findall(text):
      if not (REPO / "configs" / f"{file}.py").exists():
        continue
      for pair in arg.strip(",.").split(","):
        key, _, values = pair.partition("=")
        if "|" in values and set(values.split("|")) != choices(file, key):
          problems.append(f"{where}: configs/{file}.py:{key}={values} lists "
                          f"{sorted(values.split('|'))}; the config accepts "
                          f"{sorted(choices(file, key))}")
  return problems


def dotted_name_problems(page: Page) -> list[str]:
  problems = []
  for number, line in page.prose:
    for code in _INLINE_CODE.findall(line):
      for name in re.findall(r"\b(ofq_jax(?:\.\w+)+)", code):
        if not resolves(name):
          problems.append(f"{page.name}:{number}: {name} does not resolve")
  return problems


def resolves(dotted: str) -> bool:
  """Whether ``a.b.c`` is a module or an attribute of one."""
  parts = dotted.split(".")
  for cut in range(len(parts), 0, -1):
    try:
      target = importlib.import_module(".".join(parts[:cut]))
    except ImportError:
      continue
    for attribute in parts[cut:]:
      if not hasattr(target, attribute):
        return False
      target = getattr(target, attribute)
    return True
  return False


def modules(page: Page) -> set[str]:
  """Every ``python -m ofq_jax.<module>`` the page names."""
  return {m for _, line in _all_text(page) for m in _MODULE.findall(line)}


def runnable(page: Page) -> list[tuple[str, str, int]]:
  """The page's runs in order: (language, code, first line), continued blocks joined."""
  runs: list[list] = []
  for block in page.blocks:
    if block.language not in RUN_LANGUAGES or block.needs:
      continue
    code = block.code
    for old, new in block.replace:
      code = code.replace(old, new)
    if block.tiny:
      code = _TINY_TARGET.sub(lambda m: m.group(0) + " " + (TINY_SWIN if "arch=swin" in m.group(0)
                                                          else TINY), code)
    previous = [run for run in runs if run[0] == "python"]
    if block.continues and previous and previous[-1] is runs[-1]:
      runs[-1][1] += code
    elif block.continues and previous:
      runs.append(["python", previous[-1][1] + code, block.line])
    else:
      runs.append([block.language, code, block.line])
  return [tuple(run) for run in runs]


TRAINING_PAGES = ("README", "training", "integer", "oscillation")
"""The pages that train (or resume) the digits run in ``/tmp/ofq_digits``: they run in one
file (``test_docs_run.py``), so in one worker and one shared folder; the other pages run
beside them (``test_docs_run_other.py``)."""


def run_pages(training: bool) -> list[pathlib.Path]:
  """The pages with blocks to run: those of ``TRAINING_PAGES``, or the others."""
  return [p for p in pages() if runnable(parse(p)) and (p.stem in TRAINING_PAGES) == training]


_SHELL_SYNTAX = re.compile(r"[;&|<>()$`]|^\s*(for|while|if|do|done|then|fi|cd|export)\b")
_RAN: set[tuple[str, str]] = set()
"""``(folder, command)`` pairs that ran and succeeded in this process."""


def _steps(language: str, code: str) -> list[str]:
  """A bash block of plain one-line commands (``\\`` continuations joined) as its
  commands, so that each runs on its own; any other block as one step."""
  if language != "bash":
    return [code]
  lines = [line for line in code.replace("\\\n", " ").splitlines() if line.strip()]
  if any(_SHELL_SYNTAX.search(line.split("#")[0]) for line in lines):
    return [code]
  return lines


def run_blocks(path: pathlib.Path, tmp: pathlib.Path) -> None:
  """Runs a page's blocks in order with ``/tmp/`` as ``tmp``; fails naming the first
  block that fails, with its code and output.

  A command that already succeeded in ``tmp`` (another page's identical ``python -m
  ofq_jax.main`` resuming the same finished run, the same ``evaluate``) is not run again:
  it reads the same files and would print the same.
  """
  page = parse(path)
  env = {**os.environ, "MPLBACKEND": "Agg"}
  for language, code, line in runnable(page):
    code = code.replace("/tmp/", f"{tmp}/")
    for part in _steps(language, code):
      if (str(tmp), part) in _RAN:
        continue
      command = ([sys.executable, "-c", part] if language == "python"
                 else ["bash", "-eo", "pipefail", "-c", part])
      done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env,
                            cwd=REPO, check=False)
      assert done.returncode == 0, (
          f"{page.name}:{line}: the {language} block failed (exit {done.returncode})\n"
          f"{part}\n--- output ---\n{(done.stdout + done.stderr)[-3000:]}")
      _RAN.add((str(tmp), part))
