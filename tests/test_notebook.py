"""notebooks/sampling.ipynb runs top to bottom on a small trained run, so it never rots."""

import os

import nbclient
import nbformat

from conftest import ROOT

NOTEBOOK = os.path.join(ROOT, "notebooks", "sampling.ipynb")


def _text(outputs):
  return "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")


def test_sampling_notebook_executes(small_run, monkeypatch):
  monkeypatch.setenv("FLOWMAP_WORKDIR", small_run["workdir"])
  monkeypatch.setenv("PYTHONPATH", ROOT)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
      "commit the notebook without outputs"
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}}).execute()
  code = [c for c in nb.cells if c.cell_type == "code"]
  text = "".join(_text(c.outputs) for c in code)
  assert "source_enc (64, 16, 48) -> target_enc (64, 16, 32)" in text, text
  assert "row 0 alone maps as in the batch: True" in text, text
  assert "baselines on the run's held-out images: ridge" in text, text
  recall = float(text.split("recall@1: ")[1].split()[0])
  assert recall > 0.5, text
  cosine = float(text.split("cosine_token ")[1].split()[0])
  assert cosine > 0.8, text
  images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
  assert len(images) == 1   # the cosine histogram
