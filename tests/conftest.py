"""What the tests share: one demo image server for the session, and one dump builder, `demo.make_demo_dump`.

Tests that are not about timeouts build their dumps with `hanging=False` (no stall, drip or hostile
rows) and download them with short timeouts, so no test waits on a deadline it does not check.
`slow` marks the tests that still take more than a few seconds (a kernel, a browser, the whole
demo command); `pytest -m "not slow"` leaves them out, the README's `pytest -n 2` runs them all.

The suite runs in parallel (pytest-xdist, `-n 2`, `--dist loadgroup` from pyproject.toml): every
session fixture is one per worker, servers take a free port, files go under `tmp_path`. The tests
that load the machine hardest (a pool of worker processes killed or timed against a deadline) form
one unit of work, so no two of them run at once, and so do a few others (`GROUPS` below); the
units with most tests go first, then the slow tests, so that the two workers end together. Run
alone (`pytest` without `-n`), the order is the files' own.
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


# Which tests one worker runs one after the other, by node id, so that one list says what must not run at the same
# time or must share a worker. (Not `xdist_group` marks: pytest-xdist 3.8 cannot read them under pytest 9.2,
# pytest-xdist#1386; the scheduler below reads this table instead.)
GROUPS = {
    # many processes or threads, killed or checked against a deadline: never two of them at once
    'heavy': ('tests/test_download.py::test_kill_9_mid_run', 'tests/test_download.py::test_interrupt_keeps_records',
              'tests/test_processes.py::', 'tests/test_hostile_run.py::', 'tests/test_fetch.py::test_many_threads_of_hostile_urls',
              'tests/test_fetch.py::test_five_hundred_requests'),
    # one Dask cluster (the module's fixture, two worker processes) for all of them, not one per xdist worker;
    # the test that kills a Dask worker runs alone there too
    'dask': ('tests/test_scale.py::',),
}
RESIZE = 'tests/test_images.py::test_resize_gives_the_promised_size['  # its pictures are made once per format (lru_cache)


def group_of(nodeid:str) -> str:
    "The unit of work a test belongs to: its group, its format for the resize test, else the test itself."
    for name, prefixes in GROUPS.items():
        if nodeid.startswith(prefixes): return name
    if nodeid.startswith(RESIZE): return 'resize-' + nodeid[len(RESIZE):].rsplit('-', 1)[0]  # [GIF-longest] -> resize-GIF
    return nodeid


try: import xdist.scheduler
except ImportError: xdist = None

if xdist is not None:
    def pytest_xdist_make_scheduler(config, log):
        "Under `--dist loadgroup` (pyproject.toml's addopts), units of work as `group_of` says; the biggest units first."
        if config.getvalue('dist') != 'loadgroup': return None
        class Grouped(xdist.scheduler.LoadScopeScheduling):
            def _split_scope(self, nodeid): return group_of(nodeid)
        return Grouped(config, log)


def pytest_collection_modifyitems(config, items):
    "On an xdist worker, the slow tests first: the longest first is how two workers end together."
    if hasattr(config, 'workerinput'):  # run alone, the files' own order
        # stable: the order within each kind is kept; the notebooks (nbdev_test, a kernel each) are the longest of all
        items.sort(key=lambda item: (item.get_closest_marker('slow') is None, 'test_notebooks.py' not in item.nodeid))


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
    cfg = DownloadConfig.build(metadata=dump, output_dir=out or dump, **{**QUICK, **kw})
    return download(cfg, progress=None)
