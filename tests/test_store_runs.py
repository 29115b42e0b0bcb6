"""Runs on a store, against a real S3 API: moto's S3 server on 127.0.0.1 reached through s3fs, the endpoint and the
credentials from the environment as a user sets them. Each run to the bucket is compared row by row with a local run
of the same rows: the records, and the sha256 of every image read back from the bucket (or from its WebDataset tar).
"""
import hashlib, io, json, os, signal, subprocess, sys, tarfile, threading, time, uuid
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from laion_nb import demo, records
from laion_nb.download import DownloadConfig, download
from laion_nb.run import OutputBusy, StoreLock
from laion_nb.store import TARS_DIR, list_shards, open_store, read_parts

from _s3 import s3_fixtures
from test_scale import Recorder  # a progress object that keeps what the run told it

BUCKET = 'laion-nb-runs'
QUICK = dict(timeout=2, retries=0, allow_private_networks=True)
PERMANENT = ['status/404', 'html/{i}', 'small/{i}.jpg', 'garbage/{i}.jpg']  # failures a rerun does not try again

try: import dask.distributed as distributed
except ImportError: distributed = None
needs_dask = pytest.mark.skipif(distributed is None, reason='needs laion_nb[dask]')


s3, run_url = s3_fixtures(BUCKET)


@pytest.fixture(scope='module')
def cluster(s3):
    "A LocalCluster of 2 worker processes, started after the S3 environment is set (the workers inherit it, as a cluster's pods would get it)."
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=':0') as c, \
         distributed.Client(c) as client:
        yield c, client


def cfg_for(dump, out, **kw): return DownloadConfig.build(metadata=dump, output_dir=out, **{**QUICK, **kw})


def local_rows(out):
    "A local run's saved records by index (each image's sha256 checked against its file), and its failures as (type, status)."
    out, saved = Path(out), {}
    for line in (out/records.SAVED_FILE).read_text(encoding='utf-8').splitlines():
        r = json.loads(line); saved[r['index']] = r
        assert hashlib.sha256((out/r['path']).read_bytes()).hexdigest() == r['sha256']
    return saved, failures(json.loads((out/records.ERRORS_FILE).read_text(encoding='utf-8')))


def failures(doc): return {e['index']: (e['error_type'], e['status']) for e in doc['errors']}


def store_rows(url, storage_options=None):
    "The same as `local_rows` for a run on a store: read from its final files, each image read back from the bucket."
    st, saved = open_store(url, storage_options), {}
    tars = {}
    for line in st.get(records.SAVED_FILE).decode('utf-8').splitlines():
        r = json.loads(line); saved[r['index']] = r
        if r['path'].startswith(TARS_DIR + '/'):
            tar, _, member = r['path'].rpartition('/')
            if tar not in tars: tars[tar] = tarfile.open(fileobj=io.BytesIO(st.get(tar)))
            data = tars[tar].extractfile(member).read()
        else: data = st.get(r['path'])
        assert hashlib.sha256(data).hexdigest() == r['sha256'], r
    doc = json.loads(st.get(records.ERRORS_FILE)) if st.exists(records.ERRORS_FILE) else {'errors': []}
    return saved, failures(doc)


def same_rows(a, b):
    "Two (saved, failed) pairs agree row by row: the same rows saved with the same record (path aside), the same failures."
    (sa, fa), (sb, fb) = a, b
    drop = lambda d: {i: {k: v for k, v in r.items() if k != 'path'} for i, r in d.items()}
    assert drop(sa) == drop(sb)
    assert fa == fb


def test_a_run_to_s3_matches_a_local_run(s3, run_url, demo_dump, tmp_path):
    "download() to s3://bucket/run in this process: every row as a local run has it, images read back from the bucket."
    dump = demo_dump(n=200, fail_share=0.15, seed=3)
    local = download(cfg_for(dump, tmp_path/'local', processes=1), progress=None)
    rep = download(cfg_for(dump, run_url, processes=1), progress=None)
    assert (rep.attempted, rep.saved, rep.failed, rep.by_type) == (local.attempted, local.saved, local.failed, local.by_type)
    assert rep.summary == local.summary and rep.output_dir == run_url and rep.errors_file == f'{run_url}/{records.ERRORS_FILE}'
    same_rows(store_rows(run_url), local_rows(tmp_path/'local'))
    st = open_store(run_url)
    assert sorted({k.split('/')[0] for k in st.list()}) == ['_parts', 'download_errors.json', 'download_errors.jsonl', 'image_paths.jsonl', 'images']
    assert not any(p.name.startswith('s3') for p in Path.cwd().iterdir()), 'no local folder named s3:'
    again = download(cfg_for(dump, run_url, processes=1), progress=None)  # a rerun tries again only the transient failures
    local_again = download(cfg_for(dump, tmp_path/'local', processes=1), progress=None)
    assert (again.attempted, again.skipped) == (local_again.attempted, local_again.skipped) and again.skipped >= 190


def test_worker_processes_to_s3_and_resume_of_orphans_and_missing(s3, run_url, demo_dump, tmp_path, demo_server):
    "Two worker processes write to the bucket; an image without a record (orphan) and a record without its image (missing) are fetched again."
    dump = demo_dump(n=120, fail_share=0.1, seed=5, failures=PERMANENT)
    local = download(cfg_for(dump, tmp_path/'local', processes=1), progress=None)
    rep = download(cfg_for(dump, run_url, processes=2, threads=8), progress=None)
    assert (rep.attempted, rep.saved) == (120, local.saved)
    want = local_rows(tmp_path/'local')
    same_rows(store_rows(run_url), want)
    st, saved = open_store(run_url), sorted(want[0])
    st.delete(f'images/{saved[0]}.jpg')                     # saved, then its image lost
    orphan = saved[1]  # an image whose record never made it: drop its record from the parts, keep the image
    for key in [k for k in st.list('_parts') if k.endswith('.jsonl')]:
        lines = st.get(key).decode('utf-8').splitlines(keepends=True)
        kept = [l for l in lines if json.loads(l)['index'] != orphan]
        if len(kept) != len(lines): st.put(key, ''.join(kept))
    st.put(f'images/{orphan}.jpg', b'a half-written image')
    hits = demo_server.hits.copy()
    again = download(cfg_for(dump, run_url, processes=1), progress=None)
    assert (again.missing, again.orphans, again.attempted, again.saved) == (1, 1, 2, 2), again
    fetched = {p for p, n in demo_server.hits.items() if n != hits[p]}
    assert fetched == {urlsplit(want[0][i]['url']).path for i in saved[:2]}, 'only the two rows without image or record'
    same_rows(store_rows(run_url), want)


def test_one_run_at_a_time_on_a_store(s3, run_url, demo_dump):
    "A run's lock object refuses a second run while the first may be alive; it is gone at the end of the run."
    dump = demo_dump(n=10, fail_share=0.0)
    st = open_store(run_url)
    held = StoreLock(st)
    with pytest.raises(OutputBusy, match='in use by another run'): download(cfg_for(dump, run_url), progress=None)
    held.release()
    assert download(cfg_for(dump, run_url), progress=None).saved == 10
    assert not st.exists('_lock.json')


@pytest.mark.parametrize('where', ['local', 's3'])
def test_webdataset_shards_read_back_match_the_records(s3, run_url, demo_dump, tmp_path, where):
    "WebDataset output: tars of {index}.jpg/.txt/.json read back with tarfile, matched against the records and a local files run."
    dump = demo_dump(n=150, fail_share=0.15, seed=7)
    download(cfg_for(dump, tmp_path/'files', processes=1), progress=None)
    out = str(tmp_path/'wds') if where == 'local' else run_url
    from laion_nb.pool import LocalExecutor
    rep = download(cfg_for(dump, out, processes=1, output_format='webdataset'), progress=None, executor=LocalExecutor(tar_samples=50))
    want = local_rows(tmp_path/'files')
    same_rows(store_rows(out), want)
    st, seen = open_store(out), {}
    shards = list_shards(st)
    assert [s['samples'] for s in shards] == [50] * (rep.saved // 50) + ([rep.saved % 50] if rep.saved % 50 else [])
    for s in shards:
        with tarfile.open(fileobj=io.BytesIO(st.get(s['url'][len(st.url_of('')) + 1:]))) as tar:
            names = tar.getnames()
            for n in names[::3]:
                i = int(n.split('.')[0])
                assert names[names.index(n):names.index(n) + 3] == [f'{i}.jpg', f'{i}.txt', f'{i}.json']
                data, meta = tar.extractfile(f'{i}.jpg').read(), json.loads(tar.extractfile(f'{i}.json').read())
                assert hashlib.sha256(data).hexdigest() == want[0][i]['sha256'] and meta['index'] == i
                assert tar.extractfile(f'{i}.txt').read().decode('utf-8') == want[0][i]['caption']
                seen[i] = meta
    assert sorted(seen) == sorted(want[0]), 'every saved row in exactly one tar'
    assert not st.list('images') and not st.list('_parts') or all(k.endswith('.jsonl') for k in st.list('_parts'))


def test_a_url_with_a_slash_missing_and_a_missing_backend_are_one_line_errors(tmp_path, demo_dump):
    "`--output-dir s3:/b/run` and a scheme whose backend is not installed: exit 2, one line, no local folder."
    pytest.importorskip('fsspec')
    def cli(*argv):
        return subprocess.run([sys.executable, '-m', 'laion_nb.download', '--metadata', str(tmp_path/'nope.parquet'), *argv],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
    r = cli('--output-dir', 's3:/b/run')
    assert r.returncode == 2 and 'did you mean s3://b/run' in r.stderr.splitlines()[-1], r.stderr
    r = cli('--output-dir', 's3://b/run', '--storage-options', '[1]')
    assert r.returncode == 2 and '--storage-options' in r.stderr.splitlines()[-1], r.stderr
    try: import gcsfs  # noqa: F401
    except ImportError:
        demo_dump(n=3)
        r = subprocess.run([sys.executable, '-m', 'laion_nb.download', '--metadata', str(tmp_path/'dump'), '--output-dir', 'gs://b/run'],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert r.returncode == 2 and "pip install 'laion_nb[gcs]'" in r.stderr.splitlines()[-1], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) in (['dump'], []), 'no folder named s3: or gs:'


def test_a_missing_bucket_is_a_one_line_error(s3, tmp_path, demo_dump):
    dump = demo_dump(n=3)
    r = subprocess.run([sys.executable, '-m', 'laion_nb.download', '--metadata', str(dump), '--output-dir', 's3://no-such-bucket-here/run',
                        '--quiet'], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and 'cannot write there' in r.stderr.splitlines()[-1], r.stderr


@needs_dask
@pytest.mark.slow
@pytest.mark.parametrize('fmt', ['files', 'webdataset'])
def test_a_dask_run_to_s3_matches_a_local_run(s3, cluster, demo_dump, tmp_path, fmt):
    "A LocalCluster of 2 worker processes that share no directory writes to the bucket; row by row what a local run gives."
    from laion_nb.scale import DaskExecutor
    _, client = cluster
    dump = demo_dump(n=300, fail_share=0.15, seed=2, shard_rows=110)
    local = download(cfg_for(dump, tmp_path/'local', processes=1), progress=None)
    url = f's3://{BUCKET}/run2-{fmt}-{uuid.uuid4().hex[:6]}'
    rep = download(cfg_for(dump, url, threads=8, output_format=fmt), progress=None, executor=DaskExecutor(client, shard_size=70))
    assert (rep.attempted, rep.saved, rep.failed, rep.by_type) == (local.attempted, local.saved, local.failed, local.by_type)
    same_rows(store_rows(url), local_rows(tmp_path/'local'))
    if fmt == 'webdataset': assert [s['url'].rsplit('/', 1)[1] for s in list_shards(url)] == [f'{lo:012d}-{min(lo + 70, 300):012d}.tar' for lo in range(0, 300, 70)]


@needs_dask
def test_a_dask_run_from_a_dump_on_s3(s3, cluster, demo_dump, tmp_path):
    "The dump in the bucket (its parquet), Dask workers opening it there, the output in the bucket too: row by row what a local run gives."
    import s3fs
    from laion_nb.metadata import Dump
    from laion_nb.scale import DaskExecutor
    _, client = cluster
    dump = demo_dump(n=36, fail_share=0.2, seed=8, shard_rows=18)
    src = f's3://{BUCKET}/dump-{uuid.uuid4().hex[:6]}'
    s3fs.S3FileSystem(skip_instance_cache=True).put(str(dump/'metadate'), f'{src}/metadate', recursive=True)
    assert len(Dump(src)) == 36 and not open_store(src).exists('img_emb')  # the parquet only
    local = download(cfg_for(dump, tmp_path/'local', processes=1), progress=None)
    url = f's3://{BUCKET}/run-from-s3-{uuid.uuid4().hex[:6]}'
    rep = download(cfg_for(src, url, threads=4), progress=None, executor=DaskExecutor(client, shard_size=12))
    assert (rep.attempted, rep.saved, rep.failed, rep.by_type) == (local.attempted, local.saved, local.failed, local.by_type)
    assert rep.attempted == 36 and rep.saved and rep.failed
    same_rows(store_rows(url), local_rows(tmp_path/'local'))


def recorded(url):
    "The rows with a record in the parts of the run at `url`: saved ones by index with their record, and the failed indices."
    recs = read_parts(open_store(url))
    return {r['index']: r for r in recs.saved.to_dict('records')}, set(recs.failures['index'])


def check_resumed(url, before, hits_before, server, whole):
    "After a resume: every row recorded before is as it was (image kept, not fetched again), and the output is the whole run's."
    saved_before, _ = before
    after = store_rows(url)
    for i, r in saved_before.items():
        assert after[0][i]['sha256'] == r['sha256']
        assert server.hits[urlsplit(r['url']).path] == hits_before[urlsplit(r['url']).path], f'row {i} fetched again'
    same_rows(after, whole)


@pytest.mark.slow
def test_kill_9_of_a_cli_run_to_s3_then_resume(s3, run_url, tmp_path):
    "The command with 2 worker processes killed with kill -9 mid-run, then run again: nothing recorded is lost or fetched again."
    with demo.ImageServer(latency=0.05) as server:
        dump = demo.make_demo_dump(tmp_path/'dump', server, n=1500, fail_share=0.1, seed=5)
        download(cfg_for(dump, tmp_path/'whole', threads=64, processes=1), progress=None)
        args = ['--metadata', dump, '--timeout', '2', '--retry', '0', '--allow-private-networks', '--quiet', '--threads', '4',
                '--processes', '2', '--output-dir', run_url]
        p = subprocess.Popen([sys.executable, '-m', 'laion_nb.download', *map(str, args)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and p.poll() is None:  # kill it once parts hold a good number of records
            if len(recorded(run_url)[0]) >= 150: break
            time.sleep(0.2)
        os.killpg(p.pid, signal.SIGKILL); p.wait()
        before, hits = recorded(run_url), server.hits.copy()
        assert 150 <= len(before[0]) + len(before[1]) < 1500, 'killed mid-run'
        r = subprocess.run([sys.executable, '-m', 'laion_nb.download', *map(str, args)], capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr
        check_resumed(run_url, before, hits, server, local_rows(tmp_path/'whole'))
    assert f'{len(before[0]) + len(before[1]):,} already done' in r.stdout or 'already done' in r.stdout


@needs_dask
@pytest.mark.slow
def test_a_dask_worker_killed_mid_shard_on_s3(s3, cluster, run_url, tmp_path):
    "A worker killed mid-shard: Dask runs its shard again, which skips what the dead attempt's parts record; the same output as a local run."
    from laion_nb.scale import DaskExecutor
    _, client = cluster
    with demo.ImageServer(latency=0.03) as server:
        dump = demo.make_demo_dump(tmp_path/'dump', server, n=800, fail_share=0.2, seed=4)
        cfg = cfg_for(dump, run_url, threads=4, processes=1)
        result = {}
        run = threading.Thread(target=lambda: result.setdefault('rep', download(cfg, progress=None, executor=DaskExecutor(client, shard_size=400))))
        run.start()
        deadline, killed = time.monotonic() + 90, None
        while time.monotonic() < deadline and killed is None:  # the first parts are out: kill a worker mid-shard
            if len(recorded(run_url)[0]) >= 40:
                killed = next(iter(client.run(os.getpid).values())); os.kill(killed, signal.SIGKILL)
            time.sleep(0.1)
        before, hits = recorded(run_url), server.hits.copy()
        run.join(240)
        assert killed and not run.is_alive() and len(before[0]) < 600
        local = download(replace(cfg, output_dir=tmp_path/'local'), progress=None)
        saved_before = before[0]
        for i, r in saved_before.items(): assert server.hits[urlsplit(r['url']).path] == hits[urlsplit(r['url']).path] + 1, i  # the local run's fetch only
    rep = result['rep']
    same_rows(store_rows(run_url), local_rows(tmp_path/'local'))
    assert (rep.attempted, rep.saved, rep.failed) == (local.attempted, local.saved, local.failed)
    client.wait_for_workers(2, timeout=60)


def test_makeindex_on_a_webdataset_run_to_s3(s3, run_url, demo_dump):
    "A WebDataset run to the bucket, then makeindex: each saved row points at its sample, the shard list counts every sample."
    import fsspec
    from laion_nb.makeindex import IndexConfig, LaionIndex, makeindex
    dump = demo_dump(n=60, fail_share=0.2, seed=9)
    rep = download(cfg_for(dump, run_url, output_format='webdataset'), progress=None)
    ix = makeindex(IndexConfig(data_root=dump.parent, esc50=None, laion=LaionIndex(dir=dump, download_dir=run_url, with_index=True))).laion
    got = [json.loads(l) for l in (dump.parent/'laion_train.jsonl').read_text(encoding='utf-8').splitlines()]
    images = {o['index']: o['image'] for o in got if 'image' in o}
    saved = store_rows(run_url)[0]
    assert set(images) == set(saved) and ix.local == rep.saved == len(saved)
    for i in list(images)[:5]:
        with fsspec.open(images[i]) as f: assert hashlib.sha256(f.read()).hexdigest() == saved[i]['sha256']
    shards = json.loads((dump.parent/'laion_train_shards.json').read_text(encoding='utf-8'))
    assert shards['samples'] == rep.saved


@needs_dask
@pytest.mark.slow
def test_the_slow_tail_keeps_moving_on_dask_to_s3(s3, cluster, run_url, tmp_path):
    "Shards on the bucket waiting on stalled rows: the driver, following parts, hears how many rows are out, and every row once."
    from laion_nb.scale import DaskExecutor
    _, client = cluster
    with demo.ImageServer() as server:
        dump = demo.make_demo_dump(tmp_path/'dump', server, n=40, fail_share=0.1, failures=['stall/{i}'])
        cfg = DownloadConfig.build(metadata=dump, output_dir=run_url, timeout=1.5, retries=0, allow_private_networks=True, threads=4)
        p = Recorder()
        rep = download(cfg, progress=p, executor=DaskExecutor(client, shard_size=20))
    assert p.closed and len(p.records) == rep.attempted == 40 and len({r.index for r in p.records}) == 40
    assert [w for w in p.waits if w[1] > 0], 'no waiting() call while rows were out'
    assert all(done + out <= 40 for done, out, _ in p.waits)


@pytest.mark.slow
def test_a_worker_process_killed_mid_run_to_s3(s3, run_url, tmp_path):
    "One of two worker processes killed mid-run: the run ends, and the next one fetches only what has no record; the whole run's output."
    import psutil
    with demo.ImageServer(latency=0.05) as server:
        dump = demo.make_demo_dump(tmp_path/'dump', server, n=1200, fail_share=0.1, seed=6)
        download(cfg_for(dump, tmp_path/'whole', threads=64, processes=1), progress=None)
        cfg = cfg_for(dump, run_url, threads=4, processes=2)
        result, others = {}, {p.pid for p in psutil.Process().children()}  # a Dask cluster of this module's, say
        run = threading.Thread(target=lambda: result.setdefault('rep', download(cfg, progress=None)))
        run.start()
        deadline, killed = time.monotonic() + 90, None
        while time.monotonic() < deadline and killed is None and run.is_alive():  # its first parts are out: kill one worker
            if len(recorded(run_url)[0]) >= 100:
                killed = next(p for p in psutil.Process().children() if p.pid not in others and 'spawn_main' in ' '.join(p.cmdline()))
                killed.kill()
            time.sleep(0.1)
        run.join(120)
        assert killed and not run.is_alive()
        before, hits = recorded(run_url), server.hits.copy()
        assert result['rep'].attempted < 1200 or len(before[0]) + len(before[1]) < 1200, 'a worker died with rows in flight'
        again = download(replace(cfg, processes=1), progress=None)
        assert again.skipped >= len(before[0])
        check_resumed(run_url, before, hits, server, local_rows(tmp_path/'whole'))
