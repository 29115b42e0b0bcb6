"""Every notebook, top to bottom, in a real Jupyter kernel: what JupyterLab's Run All does.

`nbdev_test` runs the notebooks in-process and skips `#| eval: false` cells; a user's kernel runs every
cell, with `__name__ == '__main__'` and the kernel's own `sys.argv`. This runs them the user's way
with nbclient and fails on any error output, naming the notebook and the cell. `nbdev_test` itself runs
here too, as one test, so that under `pytest -n 2` its waits overlap the other tests' work.
"""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NBS = Path(__file__).resolve().parent.parent/'nbs'
NOTEBOOKS = sorted(p.name for p in NBS.glob('*.ipynb'))


def test_every_notebook_names_its_kernel():
    "No 'Select Kernel' dialog: each notebook says it runs on python3."
    missing = [name for name in NOTEBOOKS
               if json.loads((NBS/name).read_text(encoding='utf-8'))['metadata'].get('kernelspec', {}).get('name') != 'python3']
    assert not missing, f'notebooks without a python3 kernelspec: {missing}'


def problems(nb) -> list[str]:
    "Each error output of an executed notebook, and each stderr stream that holds a traceback, with its cell number."
    found = []
    for k, cell in enumerate(nb.cells):
        for out in cell.get('outputs', []):
            if out.get('output_type') == 'error':
                found.append(f'cell {k}: {out["ename"]}: {out["evalue"]}\n{cell.source[:300]}')
            elif out.get('output_type') == 'stream' and out.get('name') == 'stderr' and 'Traceback' in out.get('text', ''):
                found.append(f'cell {k}: traceback on stderr:\n{out["text"][-800:]}')
    return found


@pytest.mark.slow
@pytest.mark.parametrize('name', NOTEBOOKS)
def test_run_all_in_a_kernel(name, tmp_path):
    nb = nbformat.read(NBS/name, as_version=4)
    client = NotebookClient(nb, kernel_name='python3', timeout=600, allow_errors=True,
                            resources={'metadata': {'path': str(NBS)}})
    client.execute()
    found = problems(nb)
    assert not found, f'{name} does not run clean in a kernel:\n' + '\n\n'.join(found)


@pytest.mark.slow
def test_nbdev_test_passes():
    "`nbdev_test`, as nbdev runs the notebooks (in-process, its own workers): here so that it runs beside the other tests."
    exe = Path(sys.executable).parent/'nbdev_test'
    r = subprocess.run([str(exe if exe.exists() else 'nbdev_test'), '--do_print'], cwd=NBS.parent, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0 and 'Success.' in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
