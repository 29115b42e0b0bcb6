"The notebook widgets on real output dirs: real JPEG files and records written by records.RecordLog."
import io
import json
import re
import threading
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from laion_nb import records
import pytest

from laion_nb.widgets import (_ERROR_COLOR as ERROR_COLOR, _NO_STATUS as NO_STATUS, _SAVED_COLOR as SAVED_COLOR,
                             ErrorBreakdown, Gallery, LiveProgress, _domains as domains)

FAILURES = [('http_status', 404, 'HTTP 404 Not Found', 1), ('timeout', None, 'no answer within 10 s', 4),
            ('http_status', 503, 'HTTP 503 Service Unavailable', 4), ('not_image', None, 'text/html is not an image', 1),
            ('too_small', None, 'image is 32x32, under 64x64', 1), ('connect', None, 'connection refused', 4),
            ('http_status', 404, 'HTTP 404 Not Found', 1), ('corrupt', None, 'truncated JPEG', 1)]
SUBJECTS = ['a red cat on a sofa', 'a blue boat at sea', 'A CATHEDRAL at dusk', 'a city at night', 'une carte ancienne']


def write_image(path, i, size=(200, 150)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', size, ((37 * i) % 256, (90 + 17 * i) % 256, (200 - 13 * i) % 256)).save(path, quality=90)
    return path.stat().st_size


def write_output(out_dir, n=90, every=3, hosts=30):
    "An output dir of `n` rows: every `every`-th row failed, the rest saved as real JPEGs; returns it."
    out_dir = Path(out_dir)
    with records.RecordLog(out_dir) as log:
        for i in range(n):
            url = f'http://img{i % hosts}.example/{i}.jpg'
            if i % every == 0:
                kind, status, msg, attempts = FAILURES[(i // every) % len(FAILURES)]
                log.failed(records.Failed(i, url, kind, status, msg, attempts))
            else:
                w, h = 200 + i % 50, 150 + i % 30
                size = write_image(out_dir/'images'/f'{i}.jpg', i, (w, h))
                log.saved(records.Saved(i, f'images/{i}.jpg', url, f'{SUBJECTS[i % len(SUBJECTS)]} #{i}', w, h, size, ''))
    return out_dir


@pytest.mark.slow
def test_million_rows_render_one_page(tmp_path):
    n, page = 1_000_000, 24
    for k in range(5): write_image(tmp_path/'images'/f'{k}.jpg', k)
    template = '{{"index":{i},"path":"images/{k}.jpg","url":"http://h{h}.test/{i}.jpg","caption":"caption {i}",' \
               '"width":200,"height":150,"bytes":1000,"sha256":"","original_width":null,"original_height":null}}\n'
    with records.RecordLog(tmp_path/'check') as log:  # the fast writer below writes what RecordLog writes
        log.saved(records.Saved(7, 'images/2.jpg', 'http://h7.test/7.jpg', 'caption 7', 200, 150, 1000, ''))
    assert json.loads(template.format(i=7, k=2, h=7)) == json.loads((tmp_path/'check'/records.SAVED_FILE).read_text())
    with open(tmp_path/records.SAVED_FILE, 'w') as f:
        f.write(''.join(template.format(i=i, k=i % 5, h=i % 97) for i in range(n)))

    g = Gallery(tmp_path, page_size=page)
    assert len(g.saved) == n
    assert len(g.grid.children) == page
    assert g.thumbs_made == page and len(g._thumbs) == page
    assert g.page_label.value == f'page 1 of {-(-n // page):,} · 1,000,000 images'
    assert g.page_rows['index'].tolist() == list(range(page))

    g.search('Caption 99999')  # rows 99999, 199999, ..., 999990-999999
    expected = sum('caption 99999' in f'caption {i}' for i in range(n))
    assert g.matches == expected and len(g.grid.children) == min(page, expected)
    assert g.thumbs_made == page + min(page, expected)
    g.search('')
    g.show_page(41_666)  # the last page: 1,000,000 = 41,666 * 24 + 16
    assert len(g.grid.children) == n - 41_666 * page
    assert g.page_rows['index'].iloc[-1] == n - 1
    assert len(g._tiles) == page  # tiles are reused, not piled up


def test_gallery_controls(tmp_path):
    out = write_output(tmp_path)
    saved = records.read_saved(out)
    g = Gallery(out, page_size=10, seed=3)
    assert (g.matches, g.n_pages, len(g.grid.children)) == (60, 6, 10)
    assert g.prev_button.disabled and not g.next_button.disabled
    g.next_button.click(); g.next_button.click()
    assert g.page_label.value == 'page 3 of 6 · 60 images'
    assert g.page_rows['index'].tolist() == saved['index'][20:30].tolist()
    g.prev_button.click()
    assert g.page == 1

    captions = saved['caption'].tolist()
    g.search('cat')  # 'a red cat' and 'A CATHEDRAL'
    hits = [c for c in captions if 'cat' in c.lower()]
    assert g.matches == len(hits) and g.page == 0
    assert g.page_rows['caption'].tolist() == hits[:10]
    assert g.page_label.value == f'page 1 of {-(-len(hits) // 10)} · {len(hits)} of 60 images match “cat”'
    g.search('ancienne')
    assert g.matches == sum('ancienne' in c for c in captions) and g.search_box.value == 'ancienne'
    g.search('a.*')  # a substring, not a pattern
    assert g.matches == 0 and len(g.grid.children) == 0 and g.page_label.value.startswith('page 1 of 1 ')

    g.search('')
    g.random_button.click()
    shown = g.page_rows['index'].tolist()
    assert sorted(g.rows.tolist()) == list(range(60)) and shown != sorted(shown)
    assert set(shown) <= set(saved['index'])
    again = Gallery(out, page_size=10, seed=3); again.random_sample()
    assert again.page_rows['index'].tolist() == shown
    g.random_button.click()
    assert g.page_rows['index'].tolist() != shown


def test_search_as_you_type(tmp_path):
    "Keystrokes change the box's value one by one; one search runs after the pause, on the kernel's or a timer's thread."
    out = write_output(tmp_path)
    captions = records.read_saved(out)['caption'].tolist()
    g = Gallery(out, page_size=10, debounce=0.5)
    assert g.search_box.continuous_update
    for text in ('c', 'ca', 'cat'): g.search_box.value = text
    assert (g.searches, g.matches, g.query) == (0, 60, '')  # still typing
    g._timer.join(timeout=10)
    hits = [c for c in captions if 'cat' in c.lower()]
    assert (g.searches, g.matches, g.query) == (1, len(hits), 'cat')
    assert g.page_rows['caption'].tolist() == hits[:10] and g.search_box.value == 'cat'
    g.next_page()
    g.search_box.value = 'cat '  # the same search: the page stays
    g._timer.join(timeout=10)
    assert (g.searches, g.page) == (1, 1)
    g.search_box.value = ''  # clearing the box shows everything again
    g._timer.join(timeout=10)
    assert (g.searches, g.matches, g.page_label.value) == (2, 60, 'page 1 of 6 · 60 images')

    errors = []  # typing while the page is clicked, from two threads: the state stays whole
    def click():
        try:
            for _ in range(200): g.next_page(); g.prev_page()
        except Exception as e: errors.append(e)
    clicker = threading.Thread(target=click); clicker.start()
    for text in ('b', 'bo', 'boat', 'boa', 'boat'): g.search_box.value = text
    clicker.join(timeout=60); g._timer.join(timeout=10)
    assert not errors and g.query == 'boat' and g.matches == sum('boat' in c for c in captions)
    assert len(g.grid.children) == len(g.page_rows) == min(10, g.matches)


def test_thumbnails_small_and_missing_files(tmp_path):
    out = write_output(tmp_path, n=12)
    big = out/'images'/'1.jpg'
    Image.effect_noise((3000, 2000), 60).convert('RGB').save(big, quality=95)
    (out/'images'/'2.jpg').write_bytes(b'not a jpeg at all')
    (out/'images'/'4.jpg').unlink()
    g = Gallery(out, thumb_size=96)
    tiles = {int(r): box for r, box in zip(g.page_rows['index'], g.grid.children)}
    assert len(tiles) == 8
    bad = {i for i, box in tiles.items() if 'laion-thumb-missing' in box._dom_classes}
    assert bad == {2, 4}
    for i, box in tiles.items():
        img = box.children[0]
        with Image.open(io.BytesIO(img.value)) as t:
            assert t.format == 'JPEG' and max(t.size) <= 96
        assert len(img.value) < 6000
    assert big.stat().st_size > 1_000_000


def test_breakdown_equals_records(tmp_path):
    out = write_output(tmp_path, n=150, hosts=40)
    with records.RecordLog(out) as log:  # a second run: row 0 is saved now, row 3 fails differently
        size = write_image(out/'images'/'0.jpg', 0)
        log.saved(records.Saved(0, 'images/0.jpg', 'http://img0.example/0.jpg', 'now saved', 200, 150, size, ''))
        log.failed(records.Failed(3, 'http://img3.example/3.jpg', 'reset', None, 'connection reset', 4))
        log.failed(records.Failed(6, 'http://img6.example/6.jpg', 'internal', None, 'a bug: KeyError', 1))  # a newer type
    summary = records.summary(out)
    # what the rows written above say, counted here, not by the records code the widget reads through
    written = {i: FAILURES[(i // 3) % len(FAILURES)][:2] for i in range(0, 150, 3)}  # row -> (error type, status)
    del written[0]; written[3], written[6] = ('reset', None), ('internal', None)
    assert (summary['saved'], summary['failed']) == (101, 49) == (150 - len(written), len(written))
    assert summary['by_type'] == dict(Counter(t for t, _ in written.values()))
    assert summary['by_status'] == dict(Counter(str(st) for _, st in written.values() if st is not None))
    failed = records.read_failed(out)
    eb = ErrorBreakdown(out, samples=5)
    assert eb.summary == summary
    assert eb.outcome['count'].to_dict() == {'saved': summary['saved'], 'failed': summary['failed']}
    assert eb.by_type['count'].to_dict() == summary['by_type'] and {'reset', 'internal'} <= set(summary['by_type'])
    assert 'internal (1)' in [label for label, _ in eb.type_select.options]
    assert {k: v for k, v in eb.by_status['count'].items() if k != NO_STATUS} == summary['by_status']
    assert eb.by_status['count'][NO_STATUS] == failed['status'].isna().sum()
    assert eb.by_attempts['count'].to_dict() == {str(k): v for k, v in sorted(Counter(failed['attempts']).items())}
    assert abs(eb.by_type['share'].sum() - 1) < 1e-9

    hosts = Counter(u.split('/')[2] for u in failed['url'])
    assert len(eb.by_domain) == 20 < len(hosts) == eb.n_domains
    assert f'failures by domain (top 20 of {len(hosts)})' in eb.tables.value
    top = sorted(hosts.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
    assert list(eb.by_domain['count'].items()) == top

    html = eb.tables.value
    type_rows = re.findall(r'data-table="type" data-key="([^"]+)" data-count="(\d+)"', html)
    assert {k: int(c) for k, c in type_rows} == summary['by_type']
    assert len(re.findall(r'data-table="domain"', html)) == 20
    assert len(re.findall('class="laion-error-row"', eb.sample_rows.value)) == 5
    eb.type_select.value = 'reset'
    assert re.findall(r'class="laion-error-row" data-index="(\d+)"', eb.sample_rows.value) == ['3']
    assert eb.samples('http_status')['index'].tolist() == \
        failed[failed['error_type'] == 'http_status']['index'].head(5).tolist()
    bars = re.findall(r'data-table="(\w+)" data-key="([^"]+)".*?background:(#\w+)', html)
    assert {(t, k): c for t, k, c in bars if t == 'outcome'} == {('outcome', 'saved'): SAVED_COLOR,
                                                                 ('outcome', 'failed'): ERROR_COLOR}
    assert {c for t, k, c in bars if t != 'outcome'} == {ERROR_COLOR}  # every failure table in the error colour
    text = repr(eb)
    assert f'{summary["attempted"]:,} rows attempted' in text and re.search(r'^reset +1 ', text, re.M)


def test_domains_vectorised():
    import pandas as pd
    urls = pd.Series(['HTTPS://Www.Example.COM:443/a', 'http://u@h.test?x', 'data:image/png;base64,xx', ''])
    assert domains(urls).tolist() == ['www.example.com', 'h.test', '(no host)', '(no host)']


def test_one_outcome_for_records_dicts_and_rows(tmp_path):
    "`records.outcome`, which the widgets count by, for the shapes its example in 02b_records does not show."
    outcome = records.outcome
    import pandas as pd
    ok = records.Saved(1, 'images/1.jpg', 'u', 'c', 1, 1, 1, '')
    bad = records.Failed(2, 'u', 'timeout', None, 'slow', 4)
    assert [outcome({'index': 1}), outcome({'error_type': None}), outcome({'error_type': ''})] == ['saved'] * 3
    both = pd.DataFrame([vars(ok), vars(bad)])  # a saved row has no error type: NaN in a frame of both
    assert [outcome(r) for _, r in both.iterrows()] == ['saved', 'timeout']
    assert [outcome(r) for r in both.itertuples()] == ['saved', 'timeout']
    assert [outcome(r) for r in both.to_dict('records')] == ['saved', 'timeout']


def test_live_progress_from_threads():
    p = LiveProgress(interval=0, show=False)
    p.start(8000)
    kinds = ['saved', 'saved', 'timeout', 'http_status']

    def work(t):
        for i in range(t, 8000, 4):
            kind = kinds[i % 4]
            p.update(records.Saved(i, f'images/{i}.jpg', 'u', 'c', 1, 1, 1, '') if kind == 'saved'
                     else records.Failed(i, 'u', kind, 500 if kind == 'http_status' else None, 'm', 1))
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads: t.start()
    for t in threads: t.join(timeout=60)
    p.close()
    assert p.done == 8000 and p.counts == Counter(saved=4000, timeout=2000, http_status=2000)
    assert p.draws == 8000 + 2  # interval 0: every update redraws, plus start and close
    assert (p.bar.value, p.bar.max, p.bar.description, p.bar.bar_style) == (8000, 8000, '8,000/8,000', 'warning')
    assert 'saved 4,000' in p.stats.value and 'timeout 2,000' in p.stats.value
    assert repr(p).startswith('LiveProgress: 8,000/8,000 rows (100%) · saved 4,000 · failed 4,000')


def test_live_progress_throttled():
    p = LiveProgress(interval=3600, show=False)
    p.start(5000)
    for i in range(5000): p.update(records.Failed(i, 'u', 'dns', None, 'm', 1))
    assert p.draws == 1 and p.bar.value == 0 and p.done == 5000
    p.close()
    assert p.draws == 2 and p.bar.value == 5000 and 'dns 5,000' in p.stats.value
    p.start(10)  # a second run starts from zero
    assert p.done == 0 and p.bar.value == 0 and p.bar.max == 10


def test_live_progress_slow_tail(tmp_path):
    "The runner's protocol, called directly with real records: in the tail only `waiting` calls come."
    out = write_output(tmp_path, n=12)
    recs = [records.Saved(**r) for r in records.read_saved(out).to_dict('records')]
    recs += [records.Failed(**r) for r in records.read_failed(out).to_dict('records')]
    p = LiveProgress(interval=0, show=False)
    p.start(len(recs))
    p.waiting(8, 10.0)  # nothing done yet: what is in flight is all there is to say
    assert '8 rows waiting, up to 10 s' in p.stats.value, p.stats.value
    for r in recs[:9]: p.update(r)
    p.waiting(4, 30.0)  # 3 rows left, 4 reported in flight (a stale count): the tail
    assert '4 rows waiting, up to 30 s' in p.stats.value
    p.waiting(3, 5.5)
    assert '3 rows waiting, up to 6 s' in p.stats.value and 'left' not in p.stats.value
    draws, shown = p.draws, p.stats.value
    p.started -= 3725  # the run began an hour ago: waiting alone moves the clock on screen
    p.waiting(3, 5.5)
    assert p.draws == draws + 1 and '1:02:05 elapsed' in p.stats.value and p.stats.value != shown
    p.update(recs[9])
    assert '2 rows waiting' in p.stats.value and p.in_flight == 2
    p.waiting(2, 70)
    assert '2 rows waiting, up to 1:10' in p.stats.value
    for r in recs[10:]: p.update(r)
    p.close()
    assert p.done == 12 and p.in_flight == 0 and 'waiting' not in p.stats.value
    assert p.rate == 12 / (p.finished - p.started) and p.rate < 0.01  # the true rate: 12 rows in an hour
    assert f'{p.rate:.2g} rows/s · 1:02:05 elapsed · done' in p.stats.value and '0.0032 rows/s' in p.stats.value
    assert f'color:{ERROR_COLOR}' in p.stats.value and f'color:{SAVED_COLOR}' in p.stats.value


def test_live_progress_waiting_throttled():
    p = LiveProgress(interval=3600, show=False)
    p.start(10)
    for k in range(1000): p.waiting(10, 5.0)
    assert p.draws == 1 and 'waiting' not in p.stats.value  # stored, not drawn
    p.close()
    assert p.draws == 2
    p.start(10)  # a new run forgets what was in flight
    assert p.in_flight == 0 and p.draws == 3


@pytest.mark.slow
def test_live_progress_shows_once_in_a_kernel(tmp_path):
    "In a real kernel, as JupyterLab runs it: one panel per cell, whatever the cell does."
    import nbformat
    from nbclient import NotebookClient
    out = write_output(tmp_path/'out', n=12)
    setup = (f"from laion_nb import records\nfrom laion_nb.widgets import LiveProgress\n"
             f"recs = [records.Saved(**r) for r in records.read_saved({str(out)!r}).to_dict('records')]")
    run = "p.start(len(recs))\nfor r in recs: p.update(r)\np.close()\n"
    cells = [setup,
             "p = LiveProgress()\n" + run + "p",          # start shows it, the cell ends with it
             "display(p)\ndisplay(p)\np",                  # a later cell: shown there, once
             run,                                         # a second run in a new cell shows it there
             "quiet = LiveProgress(show=False)\nquiet.start(1)\nquiet.close()",  # show=False: not on start
             "quiet"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=120, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}).execute()
    views = [[o for o in c.outputs if 'application/vnd.jupyter.widget-view+json' in o.get('data', {})] for c in nb.cells]
    errors = [o for c in nb.cells for o in c.outputs if o.output_type == 'error']
    assert not errors, errors
    assert [len(v) for v in views] == [0, 1, 1, 1, 0, 1]
    model = {v[0]['data']['application/vnd.jupyter.widget-view+json']['model_id'] for v in views[1:4]}
    assert len(model) == 1  # the same live panel each time
    assert 'LiveProgress: 8/8 rows (100%)' in views[1][0]['data']['text/plain']


def test_bad_dirs(tmp_path):
    for cls in (Gallery, ErrorBreakdown):
        try: cls(tmp_path/'missing')
        except FileNotFoundError as e: assert 'missing: no such output directory' in str(e)
        else: raise AssertionError(f'{cls.__name__} opened a missing dir')
    (tmp_path/records.SAVED_FILE).write_text('{"index": 1}\n')
    try: Gallery(tmp_path)
    except records.BadRecordError as e: assert 'line 1' in str(e)
    else: raise AssertionError('a bad record went unnoticed')
