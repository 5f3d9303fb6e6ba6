"""experiments/quickstart.ipynb runs top to bottom on the CPU (its cells assert as they go)."""
import os

import nbclient
import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_executes():
  path = os.path.join(REPO, "experiments", "quickstart.ipynb")
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(path)}})
  client.execute()  # raises CellExecutionError, with the cell and traceback, on failure
