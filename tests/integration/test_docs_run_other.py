"""The runnable pages that train nothing shared (``test_docs_run.py`` runs the others):
a file of their own, so that pytest-xdist runs them on the other worker."""

import pytest

from support import docs_check


@pytest.mark.parametrize("path", docs_check.run_pages(training=False), ids=lambda p: p.stem)
def test_page_blocks_run(path, docs_tmp):
  docs_check.run_blocks(path, docs_tmp)
