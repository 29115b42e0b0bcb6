"Shards on a real Dask LocalCluster (2 worker processes) against the demo server: same result as one machine, a killed worker, the CLI."
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from laion_nb import demo, records
from laion_nb.download import DownloadConfig, download
from laion_nb.run import OutputBusy, lock_output, unlock_output
from laion_nb.scale import Shard, download_on_dask, plan_shards

try: import dask.distributed as distributed  # the [dask] extra; .ci installs it with [dev]
except ImportError: distributed = None
needs_dask = pytest.mark.skipif(distributed is None, reason="needs laion_nb[dask]")


@pytest.fixture(scope='module')
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=':0') as c, \
         distributed.Client(c) as client:
        yield c, client


def outcome(out):
    "Saved indices with the hashes of their files, and failed indices with their error types."
    saved, failed = records.read_saved(out), records.read_failed(out)
    for rec in saved.itertuples():
        assert hashlib.sha256((Path(out)/rec.path).read_bytes()).hexdigest() == rec.sha256
    return dict(zip(saved['index'], saved['sha256'])), dict(zip(failed['index'], failed['error_type']))


def assert_clean(out):
    out = Path(out)
    assert not (out/'shards').exists(), 'shard logs merged and removed'
    assert sorted(os.listdir(out/'images')) == sorted(f'{i}.jpg' for i in records.read_saved(out)['index']), 'no stray or temp file'
    lines = (out/'image_paths.jsonl').read_text().splitlines()
    assert len(lines) == len({json.loads(l)['index'] for l in lines}), 'no image recorded twice'


@needs_dask
def test_dask_run_matches_a_single_machine_run(cluster, tmp_path):
    _, client = cluster
    with demo.ImageServer() as server:
        dump = demo.make_demo_dump(tmp_path/'dump', server, n=500, fail_share=0.15, seed=2, shard_rows=170)
        cfg = DownloadConfig.build(metadata=dump, output_dir=tmp_path/'local', timeout=2, retries=1, allow_private_networks=True,
                             threads=8, processes=1)
        local = download(cfg, progress=None)
        rep = download_on_dask(replace(cfg, output_dir=tmp_path/'dask'), client, shard_size=60, progress=None)
    assert (rep.attempted, rep.saved, rep.failed) == (local.attempted, local.saved, local.failed) == (500, local.saved, 500 - local.saved)
    assert outcome(tmp_path/'dask') == outcome(tmp_path/'local')
    assert json.loads((tmp_path/'dask'/'download_errors.json').read_text())['summary'] == \
           json.loads((tmp_path/'local'/'download_errors.json').read_text())['summary']
    assert_clean(tmp_path/'dask')


@needs_dask
def test_max_samples_and_rerun_on_dask(cluster, tmp_path):
    _, client = cluster
    with demo.ImageServer() as server:
        dump = demo.make_demo_dump(tmp_path/'dump', server, n=120, fail_share=0.0)
        cfg = DownloadConfig.build(metadata=dump, output_dir=tmp_path/'out', allow_private_networks=True, threads=8)
        first = download_on_dask(replace(cfg, max_samples=50), client, shard_size=20, progress=None)
        hits = sum(server.hits.values())
        again = download_on_dask(replace(cfg, max_samples=50), client, shard_size=20, progress=None)
        assert (first.attempted, again.attempted, again.skipped, sum(server.hits.values())) == (50, 0, 50, hits)
        more = download_on_dask(cfg, client, shard_size=20, progress=None)
    assert (more.attempted, more.skipped) == (70, 50)
    assert records.read_saved(tmp_path/'out')['index'].tolist() == list(range(120))
    assert_clean(tmp_path/'out')


@needs_dask
@pytest.mark.slow
def test_a_worker_killed_mid_shard_gives_the_same_result(cluster, tmp_path):
    _, client = cluster
    with demo.ImageServer(latency=0.03) as server:
        # a third of the rows fail, half of those transiently: the rescheduled shard fetches those again
        dump = demo.make_demo_dump(tmp_path/'dump', server, n=800, fail_share=0.3, seed=4,
                                   failures=['reset/{i}', 'status/404', 'status/500', 'html/{i}'])
        cfg = DownloadConfig.build(metadata=dump, output_dir=tmp_path/'dask', timeout=2, retries=0, allow_private_networks=True,
                             threads=4, processes=1)
        result = {}
        run = threading.Thread(target=lambda: result.setdefault('rep', download_on_dask(cfg, client, shard_size=400, progress=None)))
        run.start()
        deadline, killed = time.monotonic() + 60, None
        while time.monotonic() < deadline and killed is None:  # the first shard is well under way: kill its worker
            logs = list((tmp_path/'dask'/'shards').glob('*/image_paths.jsonl'))
            if logs and max(l.read_bytes().count(b'\n') for l in logs) >= 40:
                pids = client.run(os.getpid)
                killed = next(iter(pids.values()))
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        run.join(240)
        assert killed and not run.is_alive()
        local = download(replace(cfg, output_dir=tmp_path/'local'), progress=None)
    rep = result['rep']
    assert records.summary(tmp_path/'dask')['attempted'] == 800
    assert outcome(tmp_path/'dask') == outcome(tmp_path/'local')
    # rows the rescheduled shard fetched again count once, with their last outcome
    assert (rep.attempted, rep.saved, rep.failed, rep.by_type) == (local.attempted, local.saved, local.failed, local.by_type)
    assert_clean(tmp_path/'dask')
    client.wait_for_workers(2, timeout=60)  # the nanny brought the worker back for the next test


@needs_dask
def test_cli_dask_scheduler(cluster, tmp_path):
    c, _ = cluster
    with demo.ImageServer() as server:
        dump = demo.make_demo_dump(tmp_path/'dump', server, n=40, fail_share=0.2, seed=7)
        r = subprocess.run([sys.executable, '-m', 'laion_nb.download', '--metadata', str(dump), '--output-dir', str(tmp_path/'out'),
                            '--allow-private-networks', '--quiet', '--timeout', '2', '--dask-scheduler', c.scheduler_address,
                            '--shard-size', '15'], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert records.summary(tmp_path/'out')['attempted'] == 40
    assert_clean(tmp_path/'out')


def test_plan_covers_every_row_once():
    shards = plan_shards(100_001, 10_000)
    assert len(shards) == 11 and shards[-1] == Shard(100_000, 100_001)
    assert sum(len(s) for s in shards) == 100_001 and all(a.stop == b.start for a, b in zip(shards, shards[1:]))


@needs_dask
def test_a_dask_run_holds_the_output_dir_lock(cluster, tmp_path):
    _, client = cluster
    with demo.ImageServer() as server:
        dump = demo.make_demo_dump(tmp_path/'dump', server, n=30, fail_share=0.0)
        cfg = DownloadConfig.build(metadata=dump, output_dir=tmp_path/'out', allow_private_networks=True, timeout=2)
        (tmp_path/'out').mkdir()
        held, release = threading.Event(), threading.Event()
        def other_run(): lock_output(tmp_path/'out'); held.set(); release.wait(30); unlock_output(tmp_path/'out')
        t = threading.Thread(target=other_run); t.start(); held.wait(10)
        with pytest.raises(OutputBusy, match=f'pid {os.getpid()}'): download_on_dask(cfg, client, shard_size=10, progress=None)
        release.set(); t.join()
        rep = download_on_dask(cfg, client, shard_size=10, progress=None)
    assert rep.attempted == 30
    took = []
    t = threading.Thread(target=lambda: (lock_output(tmp_path/'out'), took.append(1), unlock_output(tmp_path/'out'))); t.start(); t.join()
    assert took == [1], 'released at the end of the run'


@pytest.fixture
def no_dask(tmp_path, monkeypatch):
    "An environment where `import dask` fails, as after the README's plain install (for subprocesses and kernels)."
    (tmp_path/'shim'/'dask').mkdir(parents=True)
    (tmp_path/'shim'/'dask'/'__init__.py').write_text('raise ModuleNotFoundError("No module named \'dask\'", name="dask")\n')
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(tmp_path/'shim'), *filter(None, [os.environ.get('PYTHONPATH')])]))
    return os.environ.copy()


def test_without_dask_the_message_says_how_to_install_it(no_dask, tmp_path):
    code = textwrap.dedent(f"""
        from laion_nb.scale import download_on_dask
        from laion_nb.download import DownloadConfig
        try: download_on_dask(DownloadConfig.build(metadata={str(tmp_path)!r}, output_dir={str(tmp_path/'out')!r}))
        except ImportError as e: print(e)""")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60, env=no_dask)
    assert r.returncode == 0 and "the Dask executor needs: pip install 'laion_nb[dask]'" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, '-m', 'laion_nb.download', '--metadata', str(tmp_path), '--output-dir', str(tmp_path/'out'),
                        '--dask-scheduler', 'tcp://127.0.0.1:1'], capture_output=True, text=True, timeout=60, env=no_dask)
    assert r.returncode == 2 and "pip install 'laion_nb[dask]'" in r.stderr.splitlines()[-1] and 'Traceback' not in r.stderr, r.stderr


def test_the_notebook_runs_clean_without_dask(no_dask):
    "As Run All does in JupyterLab: a real kernel, every cell, no error output; the Dask cells say what to install."
    nbformat, nbclient = pytest.importorskip('nbformat'), pytest.importorskip('nbclient')
    nbs = Path(__file__).resolve().parent.parent/'nbs'
    nb = nbformat.read(nbs/'07_scale.ipynb', as_version=4)
    nbclient.NotebookClient(nb, kernel_name='python3', timeout=300, resources={'metadata': {'path': str(nbs)}}).execute()
    outs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
    assert not [o for o in outs if o.output_type == 'error' or o.get('name') == 'stderr'], outs
    assert any("pip install 'laion_nb[dask]'" in o.get('text', '') for o in outs)


class Recorder:
    "A progress object that keeps what the run told it: records, and the `waiting` calls of the slow tail."
    def __init__(self): self.records, self.waits, self.closed = [], [], False
    def start(self, total): self.total = total
    def update(self, rec): self.records.append(rec)
    def waiting(self, in_flight, longest): self.waits.append((len(self.records), in_flight, longest))
    def close(self): self.closed = True


@needs_dask
def test_the_slow_tail_keeps_moving_on_dask(cluster, tmp_path):
    "While a shard waits on a stalled row, the progress hears how many rows are still out, and no more than are left."
    _, client = cluster
    with demo.ImageServer() as server:
        dump = demo.make_demo_dump(tmp_path/'dump', server, n=40, fail_share=0.1, failures=['stall/{i}'])
        cfg = DownloadConfig.build(metadata=dump, output_dir=tmp_path/'out', timeout=1.5, retries=0, allow_private_networks=True, threads=4)
        p = Recorder()
        rep = download_on_dask(cfg, client, shard_size=20, progress=p)
    assert p.closed and len(p.records) == rep.attempted == 40
    tail = [w for w in p.waits if w[1] > 0]
    assert tail, 'no waiting() call while rows were out'
    assert all(done + out <= 40 and longest == cfg.row_deadline for done, out, longest in p.waits)
