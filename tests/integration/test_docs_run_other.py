"""The runnable pages that train nothing shared (``test_docs_run.py`` runs the others):
a file of their own, so that pytest-xdist runs them on the other worker."""

import pytest

from support import docs_check

PAGES = [p for p in docs_check.pages() if docs_check.runnable(docs_check.parse(p))
         and p.stem not in docs_check.TRAINING_PAGES]


@pytest.fixture(scope="module", name="own_tmp")
def _own_tmp(tmp_path_factory):
  return tmp_path_factory.mktemp("docs_tmp_other")


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.stem)
def test_page_blocks_run(path, own_tmp):
  docs_check.run_blocks(path, own_tmp)
