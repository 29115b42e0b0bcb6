"""What the tests share: one demo image server for the session, and one dump builder, `demo.make_demo_dump`.

Tests that are not about timeouts build their dumps with `hanging=False` (no stall, drip or hostile
rows) and download them with short timeouts, so no test waits on a deadline it does not check.
`slow` marks the tests that still take more than a few seconds (a kernel, a browser, the whole
demo command); `pytest -m "not slow"` leaves them out, the README's plain `pytest` runs them all.
"""
import signal
from pathlib import Path

import pytest

from laion_nb import demo

QUICK = dict(timeout=2, retries=1, allow_private_networks=True)  # download settings of tests not about timeouts


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes more than a few seconds (a kernel, a browser, a whole run)')
    # Several tests play a terminal's Ctrl-C (SIGINT to the suite, or to a command's process group). A
    # shell that starts the suite in the background (`cmd &` without job control) hands it SIGINT
    # ignored, and every child inherits that: those tests would then test nothing. Restore what a
    # terminal gives (a Python handler, which children started by exec get back as the default).
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN: signal.signal(signal.SIGINT, signal.default_int_handler)


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
