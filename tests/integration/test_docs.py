"""The docs say what is true: links, paths, config keys, choices, names and CLIs exist.

The rules and directives are ``tests/support/docs_check.py``'s docstring (also
docs/architecture.md, "Docs that stay true"); ``test_docs_run.py`` runs the blocks.
"""

import concurrent.futures
import importlib.util
import re
import subprocess
import sys

import pytest

from support import docs_check

PAGES = docs_check.pages()


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.stem)
def test_page_names_only_what_exists(path):
  problems = docs_check.static_problems(docs_check.parse(path))
  assert not problems, "\n".join(problems)


def test_every_named_cli_answers_help():
  """Every ``python -m ofq_jax.<module>`` in the docs exists and its ``--help`` works."""
  named = sorted(set().union(*(docs_check.modules(docs_check.parse(p)) for p in PAGES)))
  missing = [m for m in named if importlib.util.find_spec(m) is None]
  assert not missing, f"named in the docs, no such module: {missing}"

  def help_of(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                          text=True, timeout=120, cwd=docs_check.REPO, check=False)
    return module, done.returncode, done.stdout + done.stderr

  def answered(rc, out):  # absl prints the flags and exits with 1 on --help
    return rc in (0, 1) and "Traceback" not in out and ("--helpfull" in out or rc == 0)

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    failed = [(m, out[-500:]) for m, rc, out in pool.map(help_of, named)
              if not answered(rc, out)]
  assert not failed, failed
  assert "ofq_jax.main" in named and "ofq_jax.plan" in named


def test_readme_is_a_short_map():
  readme = docs_check.parse(docs_check.REPO / "README.md")
  lines = len((docs_check.REPO / "README.md").read_text().splitlines())
  assert lines <= 160, f"README.md has {lines} lines; the guides in docs/ take the detail"
  linked = {m for _, line in readme.prose for m in re.findall(r"\(docs/(\w+)\.md", line)}
  guides = {p.stem for p in (docs_check.REPO / "docs").glob("*.md")}
  assert guides <= linked, f"guides the README does not link: {sorted(guides - linked)}"


def test_readme_results_table_has_every_paper_row():
  """One row per ``recipes.IMAGENET`` entry, with its config and the paper's top-1."""
  from ofq_jax import recipes  # pylint: disable=import-outside-toplevel
  text = (docs_check.REPO / "README.md").read_text()
  rows = [line for line in text.splitlines() if line.startswith("|")]
  for (model, bits), row in recipes.IMAGENET.items():
    spec = f"configs/imagenet.py:model={model},bits={bits}"
    match = [line for line in rows if spec + "`" in line or spec + " " in line]
    assert match, f"README.md's results table has no row for {spec}"
    assert f"{row.top1:.2f}" in match[0], f"{spec}: paper top-1 {row.top1:.2f} not in {match[0]}"


def test_results_md_states_its_own_schedule():
  """RESULTS.md's schedule line is what the ablation writes today, digits config included."""
  sys.path.insert(0, str(docs_check.REPO / "bench"))
  try:
    import ablation_digits  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  line = ablation_digits.schedule_line(ablation_digits.parse_args([]))
  assert line in (docs_check.REPO / "RESULTS.md").read_text(), line


def test_key_tables_are_the_declarations():
  """docs/models.md's ``quant.*`` table and docs/training.md's ranges are generated from
  ``QUANT_KEYS`` / ``TRAINING_KEYS``: a key added, removed or changed shows here."""
  from ofq_jax import config_keys  # pylint: disable=import-outside-toplevel
  from ofq_jax.models import quant_keys  # pylint: disable=import-outside-toplevel
  for page, keys in (("models", quant_keys.QUANT_KEYS), ("training", config_keys.TRAINING_KEYS)):
    text = (docs_check.REPO / "docs" / f"{page}.md").read_text()
    table = "\n".join(config_keys.markdown_table(keys))
    assert table in text, f"docs/{page}.md: regenerate its key table:\n{table}"
