"""What the tests share: one demo image server for the session, and one dump builder, `demo.make_demo_dump`.

Tests that are not about timeouts build their dumps with `hanging=False` (no stall, drip or hostile
rows) and download them with short timeouts, so no test waits on a deadline it does not check.
`slow` marks the tests that still take more than a few seconds (a kernel, a browser, the whole
demo command); `pytest -m "not slow"` leaves them out, the README's `pytest -n 2` runs them all.

The suite runs in parallel (pytest-xdist, `-n 2`, `--dist loadgroup` from pyproject.toml): every
session fixture is one per worker, servers take a free port, files go under `tmp_path`. Slow tests
are handed out first so that the workers end together; the tests that load the machine hardest (a
pool of worker processes killed or timed against a deadline) share one xdist group, so no two of
them run at once.
"""
import signal
from pathlib import Path

import pytest

from laion_nb import demo

QUICK = dict(timeout=2, retries=1, allow_private_networks=True)  # download settings of tests not about timeouts


def pytest_configure(config):
    # Several tests play a terminal's Ctrl-C (SIGINT to the suite, or to a command's process group). A
    # shell that starts the suite in the background (`cmd &` without job control) hands it SIGINT
    # ignored, and every child inherits that: those tests would then test nothing. Restore what a
    # terminal gives (a Python handler, which children started by exec get back as the default).
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN: signal.signal(signal.SIGINT, signal.default_int_handler)


# Tests that start many processes or threads and check a deadline or a kill: one worker runs them one after the other.
# Named here, not marked in their files, so that one list says what must not run at the same time.
HEAVY = ('test_download.py::test_kill_9_mid_run', 'test_download.py::test_interrupt_keeps_records',
         'test_processes.py::', 'test_hostile_run.py::', 'test_scale.py::test_a_worker_killed',
         'test_fetch.py::test_many_threads_of_hostile_urls', 'test_fetch.py::test_five_hundred_requests')


def pytest_collection_modifyitems(config, items):
    "Slow tests first (the longest first is how two workers end together); the heavy ones in one xdist group."
    for item in items:
        if any(h in item.nodeid for h in HEAVY): item.add_marker(pytest.mark.xdist_group('heavy'))
    items.sort(key=lambda item: item.get_closest_marker('slow') is None)  # stable: the order within each kind is kept


@pytest.fixture(scope='session')
def demo_server():
    "The demo's image server on 127.0.0.1, one for the whole session (routes are deterministic by id)."
    with demo.ImageServer() as server: yield server


@pytest.fixture
def demo_dump(demo_server, tmp_path):
    "A builder of demo dumps under `tmp_path` on the session's server; no hanging rows unless asked."
    def make(name='dump', hanging=False, **kw): return demo.make_demo_dump(tmp_path/name, demo_server, hanging=hanging, **kw)
    return make


def download_quick(dump:Path, out:Path|None=None, **kw):
    "Download `dump` (into `out`, default the dump) with the quick settings; returns the report."
    from laion_nb.download import DownloadConfig, download
    cfg = DownloadConfig(metadata=dump, output_dir=out or dump, **{**QUICK, **kw})
    return download(cfg, progress=None)
