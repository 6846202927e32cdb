"""The notebooks: committed without outputs, and each one runs top to bottom on small data.

Execution uses nbclient with a ``python3`` kernel spec written by the ipykernel installed in this interpreter's
environment (so it works from a fresh ``pip install -e .[dev]`` and ignores any user-level kernel of the same name),
in a temporary working folder with ``RISKSCORE_HOME`` / ``MLFLOW_TRACKING_URI`` pointing to temporary locations and
``RISKSCORE_NOTEBOOK_ROWS`` (default 4000 here) keeping the data small.

Strip outputs before committing with ``python tests/test_notebooks.py --strip``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
EXPECTED = ("01_explore_data.ipynb", "02_train_and_evaluate.ipynb", "03_explanations.ipynb")
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) or list(EXPECTED)
ROWS = os.environ.get("RISKSCORE_NOTEBOOK_ROWS", "4000")
CELL_TIMEOUT = int(os.environ.get("RISKSCORE_NOTEBOOK_TIMEOUT", "600"))  # seconds per cell
ABSOLUTE_PATH = re.compile(r"(?<![\w.])(/home/|/Users/|/root/|/work/|/tmp/|[A-Za-z]:\\\\)")
STRIP_HINT = "strip it with: python tests/test_notebooks.py --strip"


def strip(path: Path) -> bool:
    """Remove outputs, execution counts and execution metadata from a notebook in place; True if it changed."""
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        for key in ("execution", "scrolled", "collapsed", "ExecuteTime"):
            cell.get("metadata", {}).pop(key, None)
    nb["metadata"].pop("widgets", None)
    new = json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def test_expected_notebooks_exist() -> None:
    missing = [name for name in EXPECTED if not (NOTEBOOK_DIR / name).is_file()]
    assert not missing, f"missing notebooks: {missing}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stripped(name: str) -> None:
    """Committed notebooks carry no outputs, execution counts, widget state or absolute machine paths."""
    path = NOTEBOOK_DIR / name
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    assert nb["nbformat"] == 4
    problems = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            if cell.get("outputs"):
                problems.append(f"cell {i} has outputs")
            if cell.get("execution_count") is not None:
                problems.append(f"cell {i} has an execution count")
        if "execution" in cell.get("metadata", {}):
            problems.append(f"cell {i} has execution timing metadata")
    if "widgets" in nb["metadata"]:
        problems.append("notebook metadata holds widget state")
    assert not problems, f"{name} is not stripped ({'; '.join(problems)}); {STRIP_HINT}"
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3"
    sources = "\n".join("".join(cell["source"]) for cell in nb["cells"])
    found = ABSOLUTE_PATH.search(sources)
    near = sources[max(0, found.start() - 40):found.end() + 40] if found else ""
    assert found is None, f"{name} mentions an absolute machine path near {near!r}"


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A folder with a ``python3`` kernel spec that runs this interpreter (the venv's ipykernel)."""
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(root / "python3")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name: str, kernel_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The notebook executes top to bottom without errors (small data, temporary stores, non-interactive plots)."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    home, workdir = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    workdir.mkdir()
    env = {
        "RISKSCORE_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "RISKSCORE_ARTIFACT_ROOT": (home / "mlartifacts").as_uri(),
        "RISKSCORE_NOTEBOOK_ROWS": ROWS,
        "RISKSCORE_REPO": str(REPO),  # the kernel runs in a temporary folder, not in notebooks/
        "MPLBACKEND": "Agg",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "IPYTHONDIR": str(tmp_path / "ipython"),  # no user profile or startup files
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("RISKSCORE_MODEL_CUSTOMS", "RISKSCORE_HISTORY_CUSTOMS", "RISKSCORE_DOMAINS", "RISKSCORE_AUDIT_URL"):
        monkeypatch.delenv(key, raising=False)

    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
    km = KernelManager(kernel_name="python3", kernel_spec_manager=specs)
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, startup_timeout=120,
                            resources={"metadata": {"path": str(workdir)}})
    started = time.perf_counter()
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / name)  # the executed copy, for a look after a failure
    print(f"{name}: {time.perf_counter() - started:.1f}s")
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


if __name__ == "__main__":
    if sys.argv[1:] != ["--strip"]:
        sys.exit("usage: python tests/test_notebooks.py --strip")
    for notebook in sorted(NOTEBOOK_DIR.glob("*.ipynb")):
        if strip(notebook):
            print(f"stripped {notebook.relative_to(REPO)}")
