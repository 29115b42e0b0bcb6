"Worker processes against the real demo server: they die with their parent, a terminal's Ctrl-C ends the run in its grace period with a report that matches the records, one run per output dir, `waiting` in the slow tail."
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_nb import demo, records
from laion_nb.download import DownloadConfig, download
from laion_nb.pool import RowPool
from laion_nb.run import OutputBusy, lock_output, unlock_output

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')


def long_url_dump(root, server, n, length=400, **kw):
    "A demo dump whose URLs are `length` characters long, as LAION's often are (the demo server ignores the padding query)."
    dump = demo.make_demo_dump(root, server, n=n, **kw)
    f = next((Path(root)/'metadate').glob('*.parquet'))
    t = pq.read_table(f)
    urls = [u + ('&' if '?' in u else '?') + 'pad=' + 'x' * max(0, length - len(u) - 5) for u in t['url'].to_pylist()]
    pq.write_table(t.set_column(t.schema.get_field_index('url'), 'url', pa.array(urls)), f)
    return dump


def group(pgid):
    "The live (not zombie) processes of process group `pgid`."
    found = []
    for d in os.listdir('/proc'):
        if not d.isdigit(): continue
        try: st = Path(f'/proc/{d}/stat').read_text()
        except OSError: continue
        state, _, pgrp = st.rsplit(')', 1)[1].split()[:3]
        if int(pgrp) == pgid and state != 'Z': found.append(int(d))
    return found


def gone(pgid, within=5.0):
    "Wait until no process of group `pgid` is left; the ones left then."
    deadline = time.monotonic() + within
    while group(pgid) and time.monotonic() < deadline: time.sleep(0.05)
    return group(pgid)


@contextmanager
def started(dump, out, *extra):
    "The command in its own session (so its group can be signalled as a terminal does), with 2 worker processes; killed at the end."
    p = subprocess.Popen([sys.executable, '-m', 'laion_nb.download', '--metadata', str(dump), '--output-dir', str(out),
                          '--allow-private-networks', '--quiet', '--processes', '2', '--timeout', '2', *map(str, extra)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try: yield p
    finally:
        try: os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError: pass
        p.wait(); p.stdout.close(); p.stderr.close()


def wait_records(out, n, p, within=60):
    log = Path(out)/records.SAVED_FILE
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and p.poll() is None:
        if log.exists() and log.read_bytes().count(b'\n') >= n: return
        time.sleep(0.02)
    raise AssertionError(f'fewer than {n} records in {within} s (exit code {p.poll()})')


def record_lines(out):
    return sum((Path(out)/f).read_bytes().count(b'\n') for f in (records.SAVED_FILE, records.FAILED_LOG) if (Path(out)/f).exists())


def test_kill_9_of_the_parent_leaves_no_worker(tmp_path):
    with demo.ImageServer(latency=0.05) as server:
        dump = demo.make_demo_dump(tmp_path/'dump', server, n=600, fail_share=0.0)
        with started(dump, tmp_path/'out', '--threads', '4') as p:
            wait_records(tmp_path/'out', 30, p)
            assert len(group(p.pid)) >= 3, 'the parent and its 2 workers'
            os.kill(p.pid, signal.SIGKILL); p.wait()
            assert gone(p.pid) == [], 'the workers died with their parent'
            size = record_lines(tmp_path/'out')
            time.sleep(0.5)
            assert record_lines(tmp_path/'out') == size, 'nobody writes into the output dir any more'
        with started(dump, tmp_path/'out', '--threads', '8') as resumed: _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    saved = records.read_saved(tmp_path/'out')
    assert record_lines(tmp_path/'out') == len(saved) == saved['index'].nunique() == 600, 'every row recorded once'


@pytest.mark.slow
def test_terminal_ctrl_c_with_long_urls_ends_in_the_grace_period(tmp_path):
    "6,000 rows of 400-character URLs: with the old code the parent hung in the queue finalizer after the summary."
    with demo.ImageServer(latency=0.02) as server:
        dump = long_url_dump(tmp_path/'dump', server, n=6000, fail_share=0.05, seed=3)
        with started(dump, tmp_path/'out') as p:
            wait_records(tmp_path/'out', 300, p)
            t0 = time.monotonic()
            os.killpg(p.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground group, workers included
            out, err = p.communicate(timeout=RowPool.stop_grace + 10)
            took = time.monotonic() - t0
            left = gone(p.pid, 2)
    assert p.returncode == 130, err
    assert 'Traceback' not in err, err
    assert took < RowPool.stop_grace + 5, took
    assert left == []
    m = re.search(r'([\d,]+) rows tried in [\d.]+ s \([\d.,]+/s\): ([\d,]+) saved, ([\d,]+) failed', out)
    tried, saved, failed = (int(g.replace(',', '')) for g in m.groups())
    lines = [(Path(tmp_path/'out')/f).read_bytes().count(b'\n') for f in (records.SAVED_FILE, records.FAILED_LOG)]
    assert (tried, saved, failed) == (sum(lines), *lines), 'the report counts exactly what the records hold'
    assert 300 <= tried < 6000
    saved_rows = records.read_saved(tmp_path/'out')['index']
    assert sorted(os.listdir(tmp_path/'out'/'images')) == sorted(f'{i}.jpg' for i in saved_rows), 'no image without its record'


def test_a_second_run_on_the_same_dir_is_refused(tmp_path):
    with demo.ImageServer(latency=0.2) as server, started(dump := demo.make_demo_dump(tmp_path/'dump', server, n=200, fail_share=0.0),
                                                          out := tmp_path/'out', '--threads', '2') as p:
        wait_records(out, 2, p)
        second = subprocess.run([sys.executable, '-m', 'laion_nb.download', '--metadata', str(dump), '--output-dir', str(out),
                                 '--allow-private-networks', '--quiet'], capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        last = second.stderr.strip().splitlines()[-1]
        assert str(out) in last and f'pid {p.pid}' in last and 'in use by another run' in last, last
        with pytest.raises(OutputBusy, match=f'pid {p.pid}'):  # the library refuses too
            download(DownloadConfig.build(metadata=dump, output_dir=out, allow_private_networks=True), progress=None)
        os.killpg(p.pid, signal.SIGKILL); p.wait()
        assert (out/'.laion_nb.lock').exists(), 'a stale lock file is left'
        rep = download(DownloadConfig.build(metadata=dump, output_dir=out, allow_private_networks=True, max_samples=20, threads=8,
                                      timeout=2), progress=None)
    assert rep.attempted + rep.skipped == 20, 'the stale lock is taken over'


def test_the_lock_is_released_at_the_end_and_after_an_error(tmp_path):
    with demo.ImageServer() as server:
        dump = demo.make_demo_dump(tmp_path/'dump', server, n=10, fail_share=0.0)
        cfg = DownloadConfig.build(metadata=dump, output_dir=tmp_path/'out', allow_private_networks=True, timeout=2, processes=1)
        download(cfg, progress=None)
        took = []
        t = threading.Thread(target=lambda: (lock_output(tmp_path/'out'), took.append(1), unlock_output(tmp_path/'out')))
        t.start(); t.join()
        assert took == [1], 'another run (thread) can take it after the run ended'

        class Broken:
            def start(self, total): raise RuntimeError('a broken progress')
            def update(self, rec): pass
            def close(self): pass
        with pytest.raises(RuntimeError): download(DownloadConfig.build(**{**vars(cfg), 'output_dir': tmp_path/'out2'}), progress=Broken())
        assert download(DownloadConfig.build(**{**vars(cfg), 'output_dir': tmp_path/'out2'}), progress=None).rows == 10, \
            'a lock left by an error of this thread is taken over'


class Waiting:
    "A progress object that keeps what it is shown."
    def __init__(self): self.calls, self.n = [], 0
    def start(self, total): self.total = total
    def update(self, rec): self.n += 1
    def waiting(self, in_flight, longest): self.calls.append((self.n, in_flight, longest))
    def close(self): pass


def test_waiting_shows_the_slow_tail_with_worker_processes(tmp_path):
    with demo.ImageServer() as server:
        dump = demo.make_demo_dump(tmp_path/'dump', server, n=60, fail_share=0.0)
        t = pq.read_table(dump/'metadate'/'metadata_000.parquet')
        urls = t['url'].to_pylist(); urls[-1] = server.url('stall/59')  # the last row holds the tail until its timeout
        pq.write_table(t.set_column(t.schema.get_field_index('url'), 'url', pa.array(urls)), dump/'metadate'/'metadata_000.parquet')
        cfg = DownloadConfig.build(metadata=dump, output_dir=tmp_path/'out', allow_private_networks=True, timeout=1.5, retries=0, processes=2)
        prog = Waiting()
        rep = download(cfg, progress=prog)
    assert (rep.attempted, prog.n) == (60, 60)
    tail = [(k, s) for n, k, s in prog.calls if n == 59]
    assert len(tail) >= 2, 'called a few times a second while the last row waits'
    assert all(k == 1 and 0 <= s <= cfg.row_deadline for k, s in tail), tail


def test_a_progress_without_waiting_works_with_processes(tmp_path):
    class Plain:
        def __init__(self): self.n = 0
        def start(self, total): pass
        def update(self, rec): self.n += 1
        def close(self): pass
    with demo.ImageServer() as server:
        dump = demo.make_demo_dump(tmp_path/'dump', server, n=40, fail_share=0.1)
        prog = Plain()
        rep = download(DownloadConfig.build(metadata=dump, output_dir=tmp_path/'out', allow_private_networks=True, timeout=2,
                                      processes=2), progress=prog)
    assert rep.attempted == prog.n == 40


def test_the_command_never_loads_pandas(demo_server, tmp_path):
    "The command's main process reads the dump with Arrow and the records with numpy: pandas (0.25 s of CPU to load) never is."
    dump = demo.make_demo_dump(tmp_path/'dump', demo_server, n=40, fail_share=0.25, hanging=False)
    code = ("import runpy, sys\nsys.argv = ['download_laion_images', *sys.argv[1:]]\n"
            "try: runpy.run_module('laion_nb.download', run_name='__main__')\nexcept SystemExit: pass\n"
            "print('pandas loaded:', 'pandas' in sys.modules)")
    for extra in ([], ['--retry-failed']):  # a fresh run, then a rerun that reads the records and fetches the failures again
        p = subprocess.run([sys.executable, '-c', code, '--metadata', str(dump), '--output-dir', str(dump), '--allow-private-networks',
                            '--quiet', '--processes', '2', '--timeout', '1', '--retry', '0', *extra], capture_output=True, text=True, timeout=120)
        assert 'pandas loaded: False' in p.stdout, p.stdout + p.stderr
        assert 'failed' in p.stdout and (dump/records.ERRORS_FILE).exists()  # the run ran: a summary, and the errors file written at its end
    assert len(records.read_saved(dump)) > 0
