"""Every ``python`` and ``bash`` block of README.md and docs/ runs as written.

Unless a ``<!-- docs: needs ... -->`` directive says what it needs; ``tiny`` and
``replace`` directives shrink a run; ``/tmp/`` becomes one folder that the pages share
(``support/docs_check.py``), so README.md's digits run is resumed, not retrained, by the
training guide's identical command.
"""

import os
import subprocess
import sys

import pytest

from support import docs_check

PAGES = [p for p in docs_check.pages() if docs_check.runnable(docs_check.parse(p))]


@pytest.fixture(scope="module", name="shared_tmp")
def _shared_tmp(tmp_path_factory):
  return tmp_path_factory.mktemp("docs_tmp")


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.stem)
def test_page_blocks_run(path, shared_tmp):
  page = docs_check.parse(path)
  env = {**os.environ, "MPLBACKEND": "Agg"}
  for language, code, line in docs_check.runnable(page):
    code = code.replace("/tmp/", f"{shared_tmp}/")
    command = ([sys.executable, "-c", code] if language == "python"
               else ["bash", "-eo", "pipefail", "-c", code])
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env,
                          cwd=docs_check.REPO, check=False)
    assert done.returncode == 0, (
        f"{page.name}:{line}: the {language} block failed (exit {done.returncode})\n"
        f"{code}\n--- output ---\n{(done.stdout + done.stderr)[-3000:]}")
