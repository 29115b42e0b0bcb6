"A run against hostile rows and servers: every row ends as exactly one record, in bounded time, on the real downloader."
import io
import json
import math
import re
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_nb import demo, records
from laion_nb.cli import main
from laion_nb.download import DownloadConfig, download
from laion_nb.run import TextProgress
from laion_nb.errors import is_transient


@pytest.fixture
def server():
    with demo.ImageServer() as s:  # one per test: the hanging routes of one test end with it
        yield s


def cfg_for(dump, out, **kw):
    kw = {'timeout': 1.0, 'retries': 1, 'allow_private_networks': True, 'processes': 1, **kw}
    return DownloadConfig.build(metadata=dump, output_dir=out, **kw)


def bounded(cfg, seconds=60, **kw):
    "Run `download(cfg)` in a thread; fail (instead of hanging the suite) if it does not end within `seconds`."
    got = {}
    def run():
        try: got['rep'] = download(cfg, **kw)
        except BaseException as e: got['err'] = e
    t = threading.Thread(target=run, daemon=True); t.start(); t.join(seconds)
    assert not t.is_alive(), f'download() still running after {seconds} s: it hangs'
    if 'err' in got: raise got['err']
    return got['rep']


def lines_per_index(out):
    "How many record lines each index has, over both logs."
    n = Counter()
    for name in (records.SAVED_FILE, records.FAILED_LOG):
        path = Path(out)/name
        if path.exists():
            for line in path.read_text(encoding='utf-8').splitlines(): n[json.loads(line)['index']] += 1
    return n


def table(urls, n):
    return pa.table({'url': urls, 'caption': [f'c{i}' for i in range(n)]})


@pytest.mark.parametrize('kind', ['null', 'int', 'binary', 'list', 'pandas_nan'])
def test_null_and_non_string_urls_are_invalid_url_naming_the_row(server, tmp_path, kind):
    good = [server.url(f'img/{i}.jpg') for i in range(6)]
    n = 40  # more rows than threads and queue: a dead worker thread would hang the run
    if kind == 'null': urls = pa.array([None if i % 3 == 0 else good[i % 6] for i in range(n)])
    elif kind == 'int': urls = pa.array(list(range(n)))
    elif kind == 'binary': urls = pa.array([None if i == 5 else f'http://127.0.0.1/{i}'.encode() for i in range(n)])
    elif kind == 'list': urls = pa.array([[good[0]]] * n)
    if kind == 'pandas_nan':
        pd.DataFrame({'url': [np.nan if i % 2 else good[i % 6] for i in range(n)], 'caption': ['c'] * n}).to_parquet(tmp_path/'d.parquet')
    else: pq.write_table(table(urls, n), tmp_path/'d.parquet')
    out = tmp_path/'out'
    rep = bounded(cfg_for(tmp_path/'d.parquet', out, threads=2), seconds=60, progress=None)
    assert rep.attempted == n and lines_per_index(out) == {i: 1 for i in range(n)}, 'every row: exactly one record'
    failed = records.read_failed(out).set_index('index')
    want = {'null': 'row 3: URL is null', 'int': 'row 3: URL is an int, not a string', 'binary': 'row 3: URL is bytes, not a string',
            'list': 'row 3: URL is a list, not a string', 'pandas_nan': 'row 3: URL is null'}[kind]
    assert failed.loc[3, 'error_type'] == 'invalid_url' and failed.loc[3, 'message'] == want
    assert set(failed['error_type']) == {'invalid_url'}
    saved = records.read_saved(out)['index'].tolist()
    assert saved == {'null': [i for i in range(n) if i % 3], 'pandas_nan': list(range(0, n, 2))}.get(kind, [])


def test_a_crash_of_ours_is_internal_transient_and_warned(server, tmp_path, capsys):
    pd.DataFrame({'url': [server.url(f'img/{i}.jpg') for i in range(4)], 'caption': ['c'] * 4}).to_parquet(tmp_path/'d.parquet')
    out = tmp_path/'out'
    (out/'images'/'2.jpg').mkdir(parents=True)  # the image write of row 2 fails, as on a broken disk
    rep = bounded(cfg_for(tmp_path/'d.parquet', out), progress=None)
    failed = records.read_failed(out)
    assert failed['index'].tolist() == [2] and failed['error_type'].tolist() == ['internal'], failed
    assert is_transient('internal') and 'row 2: internal error' in failed['message'][0]
    assert rep.saved == 3 and rep.by_type == {'internal': 1}
    err = capsys.readouterr().err
    assert '1 row(s) failed with an internal error' in err and len([l for l in err.splitlines() if 'internal error' in l]) == 1
    (out/'images'/'2.jpg').rmdir()
    again = bounded(cfg_for(tmp_path/'d.parquet', out), progress=None)  # transient: the next run tries it again
    assert (again.attempted, again.saved) == (1, 1) and records.read_failed(out).empty


def test_rows_behind_stuck_rows_still_run_and_stuck_ones_are_timeouts(server, tmp_path, monkeypatch):
    # two threads, both held by routes that keep the connection open (drip sends a byte every 0.2 s and
    # never ends), and a backstop made short: the rows behind must still run, each row gets one record
    monkeypatch.setattr(DownloadConfig, 'row_deadline', property(lambda self: 1.0))
    urls = [server.url('drip/1'), server.url('drip/2')] + [server.url(f'img/{i}.jpg') for i in range(20)]
    pd.DataFrame({'url': urls, 'caption': ['c'] * len(urls)}).to_parquet(tmp_path/'d.parquet')
    out = tmp_path/'out'
    cfg = cfg_for(tmp_path/'d.parquet', out, threads=2, timeout=5, retries=0)
    t0 = time.monotonic()
    rep = bounded(cfg, seconds=60, progress=None)
    took = time.monotonic() - t0
    assert lines_per_index(out) == {i: 1 for i in range(len(urls))}
    failed = records.read_failed(out).set_index('index')
    assert failed['error_type'].to_dict() == {0: 'timeout', 1: 'timeout'}
    assert 'hard deadline' in failed.loc[0, 'message']
    assert rep.saved == 20 and records.read_saved(out)['index'].tolist() == list(range(2, 22))
    assert took < cfg.fetch.timeout, f'{took:.1f} s: the rows behind waited for the stuck ones'
    assert {p.name for p in (out/'images').iterdir()} == {f'{i}.jpg' for i in range(2, 22)}, 'no image of a given-up row'


def test_an_image_deleted_after_its_record_is_fetched_again(server, tmp_path):
    pd.DataFrame({'url': [server.url(f'img/{i}.jpg') for i in range(6)], 'caption': ['c'] * 6}).to_parquet(tmp_path/'d.parquet')
    out = tmp_path/'out'
    assert bounded(cfg_for(tmp_path/'d.parquet', out), progress=None).saved == 6
    for i in (1, 4): (out/'images'/f'{i}.jpg').unlink()
    before = server.hits.copy()
    rep = bounded(cfg_for(tmp_path/'d.parquet', out), progress=None)
    assert (rep.attempted, rep.saved, rep.skipped, rep.missing) == (2, 2, 4, 2)
    assert '2 saved image(s) were gone from images/ and fetched again' in repr(rep)
    assert {p for p, n in server.hits.items() if n != before[p]} == {'/img/1.jpg', '/img/4.jpg'}
    assert sorted(int(p.stem) for p in (out/'images').iterdir()) == list(range(6))
    assert lines_per_index(out)[1] == 1, 'the record of the deleted file was taken back, then written again once'
    # gone again, and this time the server says 404: the row is a failure, not a saved image
    (out/'images'/'4.jpg').unlink()
    pd.DataFrame({'url': [server.url(f'img/{i}.jpg') for i in range(4)] + [server.url('status/404')] + [server.url('img/5.jpg')],
                  'caption': ['c'] * 6}).to_parquet(tmp_path/'d.parquet')
    rep = bounded(cfg_for(tmp_path/'d.parquet', out), progress=None)
    assert rep.missing == 1 and rep.summary['saved'] == 5 and rep.summary['by_type'] == {'http_status': 1}


@pytest.mark.parametrize('value', ['inf', 'nan', '-inf', '1e9', '0'])
def test_timeout_flag_refuses_non_finite_and_absurd_values(server, tmp_path, capsys, value):
    pd.DataFrame({'url': [server.url('img/1.jpg')], 'caption': ['c']}).to_parquet(tmp_path/'d.parquet')
    with pytest.raises(SystemExit) as e:
        main(['--metadata', str(tmp_path/'d.parquet'), '--output-dir', str(tmp_path/'out'), f'--timeout={value}',
              '--allow-private-networks', '--quiet'])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert 'argument --timeout: must be' in last, last
    assert not (tmp_path/'out').exists(), 'nothing ran'
    with pytest.raises(ValueError, match='timeout must be'): DownloadConfig.build(timeout=float(value))


def test_a_config_error_names_its_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as e: main(['--metadata', str(tmp_path/'d.parquet'), '--resize', '10'])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and 'error: --resize: resize (10) must be at least' in last, last


class Recorder:
    "A progress object that keeps what the run tells it."
    def __init__(self): self.calls = []
    def start(self, total): self.calls.append(('start', total))
    def update(self, rec): self.calls.append(('update', rec.index))
    def waiting(self, in_flight, longest): self.calls.append(('waiting', in_flight, longest))
    def close(self): self.calls.append(('close',))


def test_progress_keeps_moving_in_the_slow_tail(server, tmp_path):
    urls = [server.url(f'img/{i}.jpg') for i in range(40)] + [server.url('stall/1'), server.url('stall/2')]
    pd.DataFrame({'url': urls, 'caption': ['c'] * len(urls)}).to_parquet(tmp_path/'d.parquet')
    rec = Recorder()
    cfg = cfg_for(tmp_path/'d.parquet', tmp_path/'a', retries=0, timeout=1.5)
    bounded(cfg, progress=rec)
    waits = [c for c in rec.calls if c[0] == 'waiting']
    assert len(waits) >= 3, 'called a few times a second while the stalled rows wait'
    assert any(n == 2 and 0 < longest <= cfg.row_deadline for _, n, longest in waits), waits
    assert rec.calls[0] == ('start', 42) and rec.calls[-1] == ('close',)
    # the text bar: redrawn in the tail with what is in flight, and ending on the report's rate
    buf = io.StringIO()
    rep = bounded(cfg_for(tmp_path/'d.parquet', tmp_path/'b', retries=0, timeout=3), progress=TextProgress(file=buf))
    text = buf.getvalue()
    assert re.search(r'2 waiting, up to \d+ s', text), text
    final = text.rsplit('\r', 1)[-1]
    m = re.search(r'([\d.]+)(img/s|s/img)', final)
    assert m, final
    rate = float(m[1]) if m[2] == 'img/s' else 1 / float(m[1])
    # the report's clock also counts opening the dump, a small part of a run with a 3 s tail; tqdm's
    # default rate (a moving average of the bursts) said 3 to 10 times the report's here
    assert 0.75 < rate / rep.urls_per_s < 1.33, (final, repr(rep))
    assert 'waiting' not in final


def test_json_statuses_are_ints_and_line_separators_stay_in_their_line(server, tmp_path):
    urls = [server.url('status/404'), server.url('html/1'), server.url('img/2.jpg'), server.url('img/3.jpg')]
    caps = ['a', 'b', 'one\u2028two', 'three\u2029four\x85five']
    pd.DataFrame({'url': urls, 'caption': caps}).to_parquet(tmp_path/'d.parquet')
    out = tmp_path/'out'
    bounded(cfg_for(tmp_path/'d.parquet', out), progress=None)
    doc = json.loads((out/'download_errors.json').read_text())
    assert [e['status'] for e in doc['errors']] == [404, 200] and all(type(e['status']) is int for e in doc['errors'])
    assert '404.0' not in (out/'download_errors.json').read_text()
    text = (out/'image_paths.jsonl').read_text(encoding='utf-8')
    assert len(text.splitlines()) == 2 and sorted(json.loads(l)['caption'] for l in text.splitlines()) == caps[2:]
    assert records.read_saved(out)['caption'].tolist() == caps[2:]


HOSTILE = ['stall/1', 'drip/2', 'reset/3', 'status/503', 'garbage/5', 'html/6', 'small/7', 'truncated/8']


def test_a_hostile_mixed_run_ends_in_time_with_one_record_per_row(server, tmp_path):
    urls = []
    for k in range(30):  # hostile rows, null URLs and good rows, mixed
        urls.append(None if k % 10 == 9 else server.url(HOSTILE[k % len(HOSTILE)] if k % 3 == 0 else f'img/{k}.jpg'))
    pq.write_table(table(pa.array(urls, pa.string()), len(urls)), tmp_path/'d.parquet')
    out = tmp_path/'out'
    cfg = cfg_for(tmp_path/'d.parquet', out, timeout=1.0, retries=1, threads=len(urls))
    slots = math.ceil(len(urls) / cfg.threads)
    t0 = time.monotonic()
    rep = bounded(cfg, seconds=120, progress=None)
    took = time.monotonic() - t0
    # each row slot: every attempt timing out, the wait before the retry (at most 1 s here: 503 asks for
    # Retry-After: 1, the first backoff is under 0.75 s), and 2 s to spare
    assert took < slots * ((cfg.fetch.retries + 1) * cfg.fetch.timeout + cfg.fetch.retries * 1.0 + 2), f'{took:.1f} s'
    assert lines_per_index(out) == {i: 1 for i in range(len(urls))}, 'every row recorded exactly once'
    good = [i for i, u in enumerate(urls) if u and '/img/' in u]
    assert records.read_saved(out)['index'].tolist() == good, 'every good row saved'
    failed = records.read_failed(out).set_index('index')['error_type'].to_dict()
    assert len(failed) == len(urls) - len(good) and rep.attempted == len(urls)
    assert {failed[i] for i, u in enumerate(urls) if u is None} == {'invalid_url'}
    assert 'internal' not in failed.values()


def test_null_urls_with_worker_processes(server, tmp_path):
    n = 300
    urls = [None if i % 7 == 0 else ('' if i % 7 == 1 else server.url(f'img/{i}.jpg')) for i in range(n)]
    pq.write_table(table(pa.array(urls, pa.string()), n), tmp_path/'d.parquet')
    out = tmp_path/'out'
    rep = bounded(cfg_for(tmp_path/'d.parquet', out, processes=2, threads=4), seconds=120, progress=None)
    assert rep.attempted == n and lines_per_index(out) == {i: 1 for i in range(n)}
    failed = records.read_failed(out).set_index('index')
    assert failed.loc[7, 'message'] == 'row 7: URL is null' and failed.loc[8, 'message'] == 'row 8: URL is empty'
    assert rep.by_type == {'invalid_url': len([u for u in urls if not u])}
