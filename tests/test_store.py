"""laion_nb.store against a real S3 API: moto's S3 server on 127.0.0.1, reached through s3fs as a user reaches S3 or MinIO.

The endpoint and the credentials come from the environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), set
once for the session, as a user sets them; no test names the endpoint but the one about `storage_options`.
"""
import io, json, os, pickle, signal, subprocess, sys, tarfile, time, uuid
from pathlib import Path

import pytest

from _s3 import s3_fixtures

from laion_nb import records
from laion_nb.errors import LaionNbError, MissingExtra
from laion_nb.records import Failed, Saved
from laion_nb.store import (PARTS_DIR, TARS_DIR, BadLocation, PartWriter, Store, TarShardWriter, Unwritable, finalize,
                            list_shards, open_store, read_parts, resume)

from conftest import download_quick

BUCKET = 'laion-nb-test'
ROOT = Path(__file__).resolve().parent.parent


s3, run_url = s3_fixtures(BUCKET)


def replay(log, cls):
    "The records of a local run's log, in the order it wrote them."
    return [cls(**records._record(line, cls)) for line in log.read_bytes().splitlines()]


def saved(i, caption='a cat'):
    return Saved(i, f'images/{i}.jpg', f'https://img.example.com/{i}.jpg', caption, 64, 48, 3, f'{i:064x}', 640, 480)

def failed(i, kind='http_status', status=404):
    return Failed(i, f'https://img.example.com/{i}.jpg', kind, status, 'Not Found', 1)


def test_put_list_read_on_s3(run_url, tmp_path):
    "Objects go to the bucket through s3fs and the endpoint from the environment; keys, URLs and reads as on a local store."
    s = open_store(run_url)
    assert not s.local and s.url_of('images/1.jpg') == f'{run_url}/images/1.jpg'
    for i in (1, 2, 10): s.put(f'images/{i}.jpg', b'jpeg %d' % i)
    s.put('image_paths.jsonl', 'one line\n')
    assert s.list('images') == ['images/1.jpg', 'images/10.jpg', 'images/2.jpg']
    assert s.list() == ['image_paths.jsonl', 'images/1.jpg', 'images/10.jpg', 'images/2.jpg']
    assert s.get('images/10.jpg') == b'jpeg 10' and s.exists('images/2.jpg') and not s.exists('images/3.jpg')
    with s.open('image_paths.jsonl') as f: assert f.read() == b'one line\n'
    (tmp_path/'big.bin').write_bytes(os.urandom(1 << 20))
    s.put_file('big.bin', tmp_path/'big.bin')
    assert s.get('big.bin') == (tmp_path/'big.bin').read_bytes()
    s.delete('images/1.jpg'); s.delete('images/1.jpg')
    assert s.list('images') == ['images/10.jpg', 'images/2.jpg']
    assert pickle.loads(pickle.dumps(s)).get('images/2.jpg') == b'jpeg 2'  # what a Dask worker receives
    local = open_store(Path(os.path.relpath(tmp_path)))
    assert pickle.loads(pickle.dumps(local)).root == str(tmp_path)  # an absolute path, whatever the worker's cwd
    assert not any(p.name.startswith('s3') for p in Path.cwd().iterdir())  # and no local folder named 's3:'


def test_check_fails_early_on_a_missing_bucket(s3, run_url):
    "A run learns at its start that its bucket does not exist; a good one is checked and left as it was."
    with pytest.raises(Unwritable, match='nobucket-here.*does not exist'): open_store('s3://nobucket-here/run').check()
    s = open_store(run_url).check()
    assert s.list() == []


def test_storage_options_reach_the_client(s3, monkeypatch):
    "With no endpoint in the environment, `storage_options` says where S3 is (as --storage-options JSON would)."
    monkeypatch.delenv('AWS_ENDPOINT_URL')
    s = Store(f's3://{BUCKET}/opts-{uuid.uuid4().hex[:8]}', {'endpoint_url': s3, 'key': 'testing', 'secret': 'testing'})
    s.put('a.txt', b'a')
    assert s.get('a.txt') == b'a' and s.list() == ['a.txt']


def test_parts_of_two_shards_merge(run_url):
    "Two writers (two shards) write parts at once; the merge keeps every row's latest record, saved beating a later failure."
    import threading
    s = open_store(run_url)
    def shard(name, rows):
        with PartWriter(s, name, every=3) as w:
            for i in rows:
                if i % 4 == 3: w.failed(failed(i))
                else: w.saved(saved(i))
    ts = [threading.Thread(target=shard, args=('0000', range(0, 10))), threading.Thread(target=shard, args=('0001', range(10, 20)))]
    for t in ts: t.start()
    for t in ts: t.join()
    with PartWriter(s, '0000') as w:  # a second run of shard 0000: row 3 now saved, row 0 fails (its image stays), row 1 again
        w.saved(saved(3, 'second try')); w.failed(failed(0, 'timeout', None)); w.saved(saved(1, 'again'))
    parts = s.list(PARTS_DIR)
    assert len(parts) == 4 + 4 + 1 and parts[8].startswith(f'{PARTS_DIR}/0001/000003-')
    r = read_parts(s)
    assert r.saved['index'].tolist() == [i for i in range(20) if i % 4 != 3 or i == 3]
    assert r.saved.set_index('index').loc[[3, 1], 'caption'].tolist() == ['second try', 'again']  # the latest record wins
    assert r.failed['index'].tolist() == [7, 11, 15, 19]
    assert r.torn == []


def test_timer_writes_a_slow_shards_records(run_url):
    "A record held `seconds` goes out on its own, with no record after it: a shard of slow hosts still has its records written."
    s = open_store(run_url)
    w = PartWriter(s, '0000', every=1000, seconds=0.3)
    w.saved(saved(0)); w.failed(failed(1))
    deadline = time.monotonic() + 10
    while not s.list(PARTS_DIR) and time.monotonic() < deadline: time.sleep(0.1)
    assert len(s.list(PARTS_DIR)) == 1 and w.lines == []
    w.failed(failed(2)); w.close()
    assert read_parts(s).failed['index'].tolist() == [1, 2] and not w.timer.is_alive()


CHILD = r'''
import sys, time
from laion_nb.records import Saved
from laion_nb.store import PartWriter, Store
store = Store(sys.argv[1])
w = PartWriter(store, 'shard0', every=5, seconds=3600)
for i in range(30):
    store.put(f'images/{i}.jpg', b'first %d' % i)  # the image, then its record
    w.saved(Saved(i, f'images/{i}.jpg', f'https://img.example.com/{i}.jpg', 'c', 64, 48, 3, 'ab', 64, 48))
    if i == 12: print('ready', len(w.parts), flush=True); time.sleep(60)
'''

def test_killed_writer_resumes(run_url):
    "A writer killed with SIGKILL between flushes: its flushed records survive, the rows it held are orphans, fetched again on resume."
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    p = subprocess.Popen([sys.executable, '-c', CHILD, run_url], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()
        assert line.split() == ['ready', '2'], line  # rows 0-9 in two parts; 10, 11, 12 put and held
    finally:
        p.send_signal(signal.SIGKILL); p.wait(10); p.stdout.close()
    assert p.returncode == -signal.SIGKILL
    s = open_store(run_url)
    res = resume(s)
    assert res.outcomes.saved.tolist() == list(range(10))
    assert res.done.tolist() == list(range(10))
    assert res.orphans.tolist() == [10, 11, 12]  # images no record explains: listed, and their rows are not done
    assert res.missing.tolist() == [] and res.uncommitted == []
    with PartWriter(s, 'shard0', every=5) as w:  # the resumed run: every row not done, orphans fetched again
        assert w.seq == 2
        for i in sorted(set(range(30)) - set(res.done.tolist())):
            s.put(f'images/{i}.jpg', b'second %d' % i); w.saved(saved(i))
    out = finalize(s)
    assert (out['saved'], out['failed'], out['orphans'], out['missing']) == (30, 0, [], [])
    assert s.get('images/9.jpg') == b'first 9' and s.get('images/10.jpg') == b'second 10'  # an orphan is overwritten
    assert [json.loads(l)['index'] for l in s.get('image_paths.jsonl').splitlines()] == list(range(30))


def test_torn_local_part_is_dropped_by_rule(tmp_path):
    "A local part cut short (copied by hand, a filesystem without atomic rename): its last line is no record, and it is named."
    s = open_store(tmp_path/'run')
    with PartWriter(s, 'a') as w:
        for i in (0, 1): s.put(f'images/{i}.jpg', b'x'); w.saved(saved(i))
    key = s.list(PARTS_DIR)[0]
    data = s.get(key); (tmp_path/'run'/key).write_bytes(data[:-20])
    r = read_parts(s)
    assert r.saved['index'].tolist() == [0] and r.torn == [key]
    res = resume(s)
    assert res.done.tolist() == [0] and res.orphans.tolist() == [1]
    (tmp_path/'run'/key).write_bytes(b'{"index": 1, "url": "u"}\n' + data)
    for read in (read_parts, resume, finalize):
        with pytest.raises(records.BadRecordError, match=f'{key}, line 1'): read(s)


def test_finalize_matches_a_local_run(run_url, demo_dump, tmp_path):
    "A real local run's records, replayed through parts on S3 and finalized, give its files line for line (errors file byte for byte)."
    dump = demo_dump(n=40, fail_share=0.3)
    download_quick(dump)
    o = records.read_outcomes(dump)
    assert len(o.saved) and len(o.failed)
    s = open_store(run_url)
    with PartWriter(s, '0000', every=7) as w:
        for r in replay(dump/records.SAVED_FILE, Saved):
            s.put(r.path, (dump/r.path).read_bytes()); w.saved(r)
        for r in replay(dump/records.FAILED_LOG, Failed): w.failed(r)
    out = finalize(s)
    assert out['orphans'] == [] and {k: out[k] for k in ('attempted', 'saved', 'failed', 'by_type', 'by_status')} == o.summary()
    assert s.get(records.ERRORS_FILE) == (dump/records.ERRORS_FILE).read_bytes()
    local = (dump/records.SAVED_FILE).read_bytes().splitlines()  # the same lines, byte for byte, in the order the parts hold them
    assert sorted(s.get(records.SAVED_FILE).splitlines()) == sorted(local) and len(set(local)) == len(o.saved)
    assert set(s.get(records.FAILED_LOG).splitlines()) <= set((dump/records.FAILED_LOG).read_bytes().splitlines())
    copy = tmp_path/'copy'; copy.mkdir()  # the bucket synced to a disk reads as a local output dir
    for name in (records.SAVED_FILE, records.FAILED_LOG): (copy/name).write_bytes(s.get(name))
    assert records.read_outcomes(copy).summary() == o.summary()


def _jpeg(i):
    from PIL import Image
    b = io.BytesIO(); Image.new('RGB', (64 + i, 48), (i * 20 % 256, 100, 50)).save(b, 'JPEG'); return b.getvalue()

def test_tar_shards_read_back(run_url):
    "Shards published on S3 read back with tarfile and webdataset: each sample's three files grouped under its row index."
    s = open_store(run_url)
    rows = {0: list(range(0, 6)), 1: [6, 7, 10, 123456789]}
    for shard, idx in rows.items():
        with TarShardWriter(s, f'{shard:05d}') as t:
            for i in idx: t.add(saved(i, f'caption {i} ✓'), _jpeg(i % 8))
    with pytest.raises(KeyboardInterrupt):
        with TarShardWriter(s, '00002') as t: t.add(saved(99), _jpeg(1)); raise KeyboardInterrupt
    shards = list_shards(s)
    assert shards == [{'url': f'{run_url}/{TARS_DIR}/00000.tar', 'samples': 6}, {'url': f'{run_url}/{TARS_DIR}/00001.tar', 'samples': 4}]
    recs = read_parts(s).saved.set_index('index')
    assert sorted(recs.index) == rows[0] + rows[1]
    for sh in shards:
        tar = tarfile.open(fileobj=io.BytesIO(s.get(sh['url'][len(run_url) + 1:])))
        names = tar.getnames()
        assert len(names) == 3 * sh['samples']
        for name in names[::3]:
            i = int(name.split('.')[0])
            meta = json.loads(tar.extractfile(f'{i}.json').read())
            assert meta == {**vars(saved(i, f'caption {i} ✓')), 'path': recs.loc[i, 'path']}
            assert tar.extractfile(f'{i}.txt').read().decode() == f'caption {i} ✓'
            assert tar.extractfile(f'{i}.jpg').read() == _jpeg(i % 8)
    wds = pytest.importorskip('webdataset')
    got = {}
    with s.open(f'{TARS_DIR}/00001.tar') as f:
        for sample in wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([{'stream': f, 'url': 'x'}])):
            got[int(sample['__key__'])] = sample
    assert sorted(got) == rows[1]
    for i, sample in got.items():
        assert set(sample) >= {'jpg', 'txt', 'json'} and sample['txt'].decode() == f'caption {i} ✓'
        assert json.loads(sample['json'])['index'] == i and sample['jpg'] == _jpeg(i % 8)


TAR_CHILD = r'''
import sys, time
from laion_nb.records import Saved
from laion_nb.store import PartWriter, Store, TarShardWriter
store = Store(sys.argv[1])
with PartWriter(store, '00001', every=2) as w, TarShardWriter(store, '00001') as t:
    for i in range(10, 16):
        if i % 3: t.add(Saved(i, '', f'https://img.example.com/{i}.jpg', 'c', 64, 48, 4, 'ab', 64, 48), b'jpeg')
        else: w.failed(Failed(i, f'https://img.example.com/{i}.jpg', 'http_status', 404, 'Not Found', 1))
    print('ready', flush=True); time.sleep(60)
'''.replace('import Saved', 'import Failed, Saved')

def test_worker_killed_mid_shard(run_url):
    "A WebDataset writer killed mid-shard publishes nothing: its saved rows are not done, its failures are; a tar cut off before its parquet is listed and overwritten."
    s = open_store(run_url)
    with TarShardWriter(s, '00000') as t: t.add(saved(0), b'jpeg')
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    p = subprocess.Popen([sys.executable, '-c', TAR_CHILD, run_url], stdout=subprocess.PIPE, text=True, env=env)
    try: assert p.stdout.readline().strip() == 'ready'
    finally: p.send_signal(signal.SIGKILL); p.wait(10); p.stdout.close()
    res = resume(s)
    assert res.done.tolist() == [0, 12, 15] and res.uncommitted == []  # the failures were flushed; no sample of the shard was published
    assert s.list(TARS_DIR) == [f'{TARS_DIR}/00000.parquet', f'{TARS_DIR}/00000.tar']
    s.put(f'{TARS_DIR}/00001.tar', b'cut off before its commit')  # what a kill between the tar and its parquet leaves
    assert resume(s).uncommitted == ['00001'] and [x['samples'] for x in list_shards(s)] == [1]
    with TarShardWriter(s, '00001') as t:
        assert t.name == '00001'  # not committed: its name is taken again, the tar overwritten
        for i in (10, 11, 13, 14): t.add(saved(i), b'jpeg')
    res = resume(s)
    assert res.uncommitted == [] and res.done.tolist() == [0, 10, 11, 12, 13, 14, 15]
    assert [x['samples'] for x in list_shards(s)] == [1, 4]


def test_url_shaped_paths_never_become_folders(tmp_path, monkeypatch):
    "A URL, or a URL with a slash missing, is never a local folder: `s3:/b/run` is a clear error and nothing is created."
    monkeypatch.chdir(tmp_path)
    for typo in ('s3:/bucket/run', Path('s3://bucket/run'), 'gs:bucket/run'):
        with pytest.raises(BadLocation, match='did you mean'): open_store(typo)
    with pytest.raises(BadLocation, match="no storage backend knows the scheme 'nope'"): open_store('nope://bucket/run')
    s = open_store('memory://bucket/run'); s.put('images/1.jpg', b'x')
    assert list(tmp_path.iterdir()) == []
    assert open_store('file://' + str(tmp_path/'out')).local and open_store('./data:v2').local


def _absent_backend():
    "A URL scheme fsspec knows whose backend package is not installed here (gs:// unless gcsfs is)."
    import fsspec
    from fsspec.registry import known_implementations
    for proto in ['gs', *sorted(known_implementations)]:
        try: fsspec.get_filesystem_class(proto)
        except ImportError: return proto
    pytest.skip('every fsspec backend is installed')

def test_missing_backend_names_the_extra():
    "A scheme whose backend is not installed: one line, a LaionNbError, saying what to pip install."
    proto = _absent_backend()
    with pytest.raises(MissingExtra) as e: open_store(f'{proto}://bucket/run')
    msg = str(e.value)
    assert isinstance(e.value, LaionNbError) and '\n' not in msg and 'pip install' in msg
    if proto == 'gs': assert "pip install 'laion_nb[gcs]'" in msg


def test_duplicates_a_torn_part_and_old_lines(run_url, tmp_path):
    "Rows failed then saved, saved twice, a torn part and a part of old non-compact lines: latest wins, counts as written, files in part order."
    from laion_nb.io import jsonl_line
    s = open_store(run_url)
    for i in (0, 1, 3, 5, 6, 7): s.put(f'images/{i}.jpg', b'x')
    first = [saved(0), failed(1), failed(2, 'timeout', None), saved(3)]
    second = [saved(1), saved(3, 'again'), failed(4)]  # 1 failed, then saved; 3 saved twice
    with PartWriter(s, 'a', every=4) as w:
        for r in first + second: (w.failed if isinstance(r, Failed) else w.saved)(r)
    line = lambda r, compact=True: jsonl_line(vars(r), compact=compact).encode()
    torn = s.put(f'{PARTS_DIR}/b/000000-0000000b.jsonl', line(saved(5)) + line(saved(6))[:-30])  # 6's record cut short: an orphan
    old = [saved(7), failed(8, 'dns', None)]
    s.put(f'{PARTS_DIR}/c/000000-0000000c.jsonl', b''.join(line(r, compact=False) for r in old))  # written before parts were compact
    res = resume(s)
    assert (res.outcomes.saved.tolist(), res.outcomes.failed.tolist()) == ([0, 1, 3, 5, 7], [2, 4, 8])
    assert res.done.tolist() == [0, 1, 3, 4, 5, 7, 8] and res.orphans.tolist() == [6] and res.missing.tolist() == []
    assert resume(s, retry_failed=True).done.tolist() == [0, 1, 3, 5, 7]
    out = finalize(s)
    assert out == {'attempted': 8, 'saved': 5, 'failed': 3, 'by_type': {'timeout': 1, 'http_status': 1, 'dns': 1},
                   'by_status': {'404': 1}, 'orphans': [6], 'missing': [], 'torn': [torn]}
    written = [saved(0), saved(3), saved(1), saved(3, 'again'), saved(5), saved(7)]  # part order, duplicates kept
    assert s.get(records.SAVED_FILE) == b''.join(line(r) for r in written[:5]) + line(saved(7), compact=False)
    assert [json.loads(l)['index'] for l in s.get(records.FAILED_LOG).splitlines()] == [1, 2, 4, 8]
    local = tmp_path/'local'  # the same records written by a local run's RecordLog: the same errors file, byte for byte
    with records.RecordLog(local) as log:
        for r in first + second + [saved(5)] + old: (log.failed if isinstance(r, Failed) else log.saved)(r)
    records.write_errors_json(local)
    assert s.get(records.ERRORS_FILE) == (local/records.ERRORS_FILE).read_bytes()
    copy = tmp_path/'copy'; copy.mkdir()
    for name in (records.SAVED_FILE, records.FAILED_LOG): (copy/name).write_bytes(s.get(name))
    o = records.read_outcomes(copy)
    assert o.summary() == records.read_outcomes(local).summary() and [r['caption'] for r in read_parts(s).saved.to_dict('records')][2] == 'again'


def test_a_missing_image_after_a_failure_counts_as_failed(run_url):
    "A row that failed, then was saved, then lost its image: finalize drops its saved lines and reports its failure; resume fetches it."
    s = open_store(run_url)
    with PartWriter(s, 'a') as w:
        w.failed(failed(0)); w.saved(saved(0)); w.saved(saved(1)); w.saved(saved(2))
    s.put('images/1.jpg', b'x'); s.put('images/2.jpg', b'x')
    res = resume(s)
    assert res.missing.tolist() == [0] and res.done.tolist() == [0, 1, 2]  # its 404 stands: not fetched again
    assert resume(s, retry_failed=True).done.tolist() == [1, 2]
    out = finalize(s)
    assert (out['saved'], out['failed'], out['missing']) == (2, 1, [0])
    assert [json.loads(l)['index'] for l in s.get(records.SAVED_FILE).splitlines()] == [1, 2]
