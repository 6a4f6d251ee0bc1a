"""Every ``python`` and ``bash`` block of README.md and docs/ runs as written.

Unless a ``<!-- docs: needs ... -->`` directive says what it needs; ``tiny`` and
``replace`` directives shrink a run; ``/tmp/`` becomes one folder that the pages share
(``support/docs_check.py``), so README.md's digits run is resumed, not retrained, by the
training guide's identical command. The other pages run in ``test_docs_run_other.py``.
"""

import pytest

from support import docs_check


@pytest.mark.parametrize("path", docs_check.run_pages(training=True), ids=lambda p: p.stem)
def test_page_blocks_run(path, docs_tmp):
  docs_check.run_blocks(path, docs_tmp)
