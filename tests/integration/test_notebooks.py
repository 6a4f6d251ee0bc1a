"""The Colab notebooks run top to bottom (tiny settings injected after their
parameters cell, as papermill does), so they cannot rot."""

import base64
import json
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from support import REPO

COLABS = REPO / "colabs"


def execute(name: str, workdir: pathlib.Path, **params) -> nbformat.NotebookNode:
  """Runs ``colabs/<name>`` with ``params`` overriding its parameters cell."""
  nb = nbformat.read(COLABS / name, as_version=4)
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  values = dict(INSTALL=False, TINY=True, WORKDIR=str(workdir), **params)
  injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()))
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, injected)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(workdir)}}).execute()
  return nb


def outputs(nb, kind: str) -> list:
  return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
          if kind in o.get("data", {})]


def text(nb) -> str:
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      parts.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
  return "\n".join(parts)


def test_notebooks_are_stored_without_outputs():
  for path in sorted(COLABS.glob("*.ipynb")):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    # As stored (nbformat.read fills missing ids in, with a warning that they will be
    # required): every cell has its own id.
    ids = [cell.get("id") for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]]
    assert None not in ids and len(set(ids)) == len(ids), path.name
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, path.name
  assert len(list(COLABS.glob("*.ipynb"))) == 3


def test_quickstart_trains_and_shows_its_plots(tmp_path):
  nb = execute("quickstart.ipynb", tmp_path)
  images = outputs(nb, "image/png")
  shown = [line for line in text(nb).splitlines()  # the paths the plots cell prints
           if line.startswith(str(tmp_path)) and line.endswith(".png")]
  assert len(images) == len(shown) >= 3  # one image per plot file
  for name in ("oscillation.png", "scales_block0.png", "accuracy.png"):
    assert any(line.endswith(name) for line in shown), name
  assert all(base64.b64decode(o["data"]["image/png"])[:4] == b"\x89PNG" for o in images)
  assert "after CGA  top-1" in text(nb)
  assert (tmp_path / "summary.json").exists()


def test_bring_your_own_deit(tmp_path):
  nb = execute("bring_your_own_deit.ipynb", tmp_path)
  out = text(nb)
  assert "timm / FB DeiT" in out and "OFQ reference" in out
  assert (tmp_path / "qat_run" / "models" / "qat").is_dir()


def test_oscillation_analysis_plots_lsq_against_ofq(tmp_path):
  nb = execute("oscillation_analysis.ipynb", tmp_path)
  assert len(outputs(nb, "image/png")) == 2
  out = text(nb)
  assert "LSQ  top-1" in out and "OFQ  top-1" in out and "after CGA" in out


@pytest.mark.parametrize("name", ["quickstart.ipynb", "bring_your_own_deit.ipynb",
                                  "oscillation_analysis.ipynb"])
def test_every_notebook_has_a_parameters_cell_and_installs_when_asked(name):
  nb = nbformat.read(COLABS / name, as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1 and "INSTALL = True" in params[0].source
  assert any("pip" in c.source and "if INSTALL" in c.source for c in nb.cells)
