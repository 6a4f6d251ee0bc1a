"""Every ``python`` and ``bash`` block of README.md and docs/ runs as written.

Unless a ``<!-- docs: needs ... -->`` directive says what it needs; ``tiny`` and
``replace`` directives shrink a run; ``/tmp/`` becomes one folder that the pages share
(``support/docs_check.py``), so README.md's digits run is resumed, not retrained, by the
training guide's identical command.
"""

import pytest

from support import docs_check

PAGES = [p for p in docs_check.pages() if docs_check.runnable(docs_check.parse(p))
         and p.stem in docs_check.TRAINING_PAGES]


@pytest.fixture(scope="module", name="shared_tmp")
def _shared_tmp(tmp_path_factory):
  return tmp_path_factory.mktemp("docs_tmp")


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.stem)
def test_page_blocks_run(path, shared_tmp):
  docs_check.run_blocks(path, shared_tmp)
