"""The widgets in a real browser: JupyterLab on 127.0.0.1 and Debian's headless Chromium driven by playwright.

Marked `browser` (deselect with `-m "not browser"`); it runs in CI, where `.ci/system-deps` installs Chromium.
The screenshots go to artifacts/widgets_browser.png (as rendered) and widgets_browser_controls.png
(after paging, typing a search and choosing an error type).
"""
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

import pandas as pd

from conftest import download_quick
from laion_nb import demo, records

CHROMIUM = os.environ.get('LAION_NB_CHROMIUM', '/usr/bin/chromium')
ARTIFACTS = Path(__file__).resolve().parent.parent/'artifacts'
WAIT_MS = int(os.environ.get("LAION_NB_BROWSER_WAIT_MS", 120_000))  # the longest we wait for the notebook to render
PAGE_SIZE, SAMPLES = 24, 20

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# What each of the demo's quick failures ends as (the demo notebook documents its routes; 06_demo and 03_download check them): the expected screen
# is worked out from the dump's URLs with this table, not read back through the records the widgets read.
ROUTE_OUTCOME = {'status/404': ('http_status', 404), 'status/403': ('http_status', 403), 'status/410': ('http_status', 410),
                 'status/500': ('http_status', 500), 'html': ('not_image', 200), 'small': ('too_small', 200),
                 'truncated': ('corrupt', 200), 'garbage': ('not_image', 200), 'loop': ('too_many_redirects', 302),
                 'reset': ('reset', None), 'img': ('saved', None)}  # (error type, the HTTP status it came with)


def expected(dump):
    "The summary, the failed rows and the saved rows (index, caption) that the widgets must show for `dump`."
    rows = pd.read_parquet(dump/'metadate'/'metadata_000.parquet', columns=['url', 'caption']).reset_index(names='index')
    path = rows['url'].str.split('/', n=3).str[3].str.split('?').str[0]
    route = path.where(path.str.startswith('status/'), path.str.split('/').str[0])
    assert set(route) <= set(ROUTE_OUTCOME), set(route) - set(ROUTE_OUTCOME)
    kind, status = route.map(lambda r: ROUTE_OUTCOME[r][0]), route.map(lambda r: ROUTE_OUTCOME[r][1])
    bad = kind != 'saved'
    summary = {'attempted': len(rows), 'saved': int((~bad).sum()), 'failed': int(bad.sum()),
               'by_type': dict(Counter(kind[bad]).most_common()),  # most first, ties in the order of their first row
               'by_status': {str(k): n for k, n in Counter(status[bad].dropna().astype(int)).most_common()}}
    return summary, rows['index'][bad].tolist(), rows.loc[~bad, ['index', 'caption']].reset_index(drop=True)


CHINESE = '河内的街头小吃'  # "street food in Hanoi": the guide's readers' captions are Chinese; the screenshot must show them


def with_chinese_captions(dump):
    "Give the dump's 'street food in Hà Nội' rows a Chinese caption; returns the dump."
    path = dump/'metadate'/'metadata_000.parquet'
    t = pd.read_parquet(path)
    hanoi = t['caption'].str.startswith('street food in')
    assert hanoi.any()
    t.loc[hanoi, 'caption'] = [f'{CHINESE} #{i}' for i in t.index[hanoi]]
    t.to_parquet(path, index=False)
    return dump


def cjk_font() -> str:
    "The font family fontconfig (so Chromium) draws Chinese with, or '' when none is installed."
    r = subprocess.run(['fc-match', '-f', '%{family}', 'sans-serif:lang=zh-cn'], capture_output=True, text=True)
    family = r.stdout if r.returncode == 0 else ''
    return family if 'CJK' in family or 'Han' in family or 'Hei' in family else ''


def make_output(out_dir, dump):
    "The output dir the notebook shows: a real download of `dump` from the demo server, with short timeouts."
    download_quick(dump, out_dir)
    return out_dir


def notebook(out_name):
    cells = [f"from laion_nb.widgets import Gallery, ErrorBreakdown\nout = {out_name!r}",
             f"gallery = Gallery(out, page_size={PAGE_SIZE})\ngallery",
             f"breakdown = ErrorBreakdown(out, samples={SAMPLES})\nbreakdown",
             # the download's progress protocol, fed with the records: the panel shows itself on start
             "from laion_nb import records\nfrom laion_nb.widgets import LiveProgress\n"
             "rows = [records.Saved(**r) for r in records.read_saved(out).to_dict('records')]\n"
             "rows += [records.Failed(**r) for r in records.read_failed(out).to_dict('records')]\n"
             "progress = LiveProgress()\nprogress.start(len(rows))\n"
             "for r in rows: progress.update(r)\nprogress.close()\nprogress",  # ends with the panel: still shown once
             # a run in its slow tail: one row recorded, two in flight, only `waiting` calls come
             "tail = LiveProgress(interval=0)\ntail.start(3)\ntail.update(rows[0])\ntail.waiting(2, 8.0)"]
    return {'cells': [{'cell_type': 'code', 'execution_count': None, 'id': f'c{k}', 'metadata': {}, 'outputs': [],
                       'source': src} for k, src in enumerate(cells)],
            'metadata': {'kernelspec': {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'}},
            'nbformat': 4, 'nbformat_minor': 5}


def wait_for_server(url, proc, log, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = '\n'.join(Path(log).read_text(errors='replace').splitlines()[-15:])
            raise RuntimeError(f'JupyterLab exited with {proc.returncode}:\n{tail}')
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f'JupyterLab did not answer {url} within {timeout} s')


def wait_for_kernel(base, token, timeout=60):
    "Wait until the notebook's kernel is idle and the browser is connected to it."
    deadline, kernels = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f'{base}/api/kernels?token={token}', timeout=5) as r:
                kernels = json.load(r)
        except OSError as e:
            kernels = e
        else:
            if any(k['execution_state'] == 'idle' and k['connections'] > 0 for k in kernels): return
        time.sleep(0.3)
    raise TimeoutError(f'no idle kernel with a browser connected within {timeout} s: {kernels}')


def stop_server(proc, base, token):
    "Shut JupyterLab and its kernels down: politely through its API, then by signal to its process group."
    try:
        req = urllib.request.Request(f'{base}/api/shutdown', method='POST', headers={'Authorization': f'token {token}'})
        urllib.request.urlopen(req, timeout=5).close()
    except OSError:
        pass
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try: proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait(timeout=10)


def lab_settings(home):
    "Isolated Jupyter dirs and settings: no update checks, no news, no kernel dialog, every cell kept in the DOM."
    dirs = {k: home/k.lower() for k in ('JUPYTER_CONFIG_DIR', 'JUPYTER_DATA_DIR', 'JUPYTER_RUNTIME_DIR', 'IPYTHONDIR')}
    for d in dirs.values(): d.mkdir(parents=True)
    (dirs['JUPYTER_CONFIG_DIR']/'jupyter_lab_config.py').write_text(
        "c.LabApp.news_url = None\nc.LabApp.check_for_updates_class = 'jupyterlab.NeverCheckForUpdate'\n"
        "c.LabApp.extension_manager = 'readonly'\n")
    settings = home/'lab-settings'
    for plugin, values in {'notebook-extension/tracker': {'windowingMode': 'none', 'autoStartDefaultKernel': True},
                           'apputils-extension/notification': {'fetchNews': 'false'}}.items():
        path = settings/'@jupyterlab'/f'{plugin}.jupyterlab-settings'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = {**os.environ, **{k: str(v) for k, v in dirs.items()}}
    return env, ['--LabApp.user_settings_dir=' + str(settings), '--LabApp.workspaces_dir=' + str(home/'workspaces')]


def run_all_cells(page, base, token, path):
    "Open the notebook at `path` in JupyterLab and run all its cells from the Run menu."
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    page.goto(f'{base}/lab/tree/{path}?token={token}')
    page.wait_for_selector('.jp-NotebookPanel .jp-Cell')
    wait_for_kernel(base, token)
    page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]')
    for attempt in range(2):  # a click while the page still connects to the kernel can be lost: check, retry once
        page.click('.lm-MenuBar-item:has-text("Run")')
        page.click('.lm-Menu-item:has-text("Run All Cells")')
        try:
            page.wait_for_function("() => !document.querySelector('.jp-Cell .jp-InputPrompt').innerText.includes('[ ]')",
                                   timeout=20_000)
            return
        except PlaywrightTimeout:
            if attempt: raise


def check_widgets(page, summary, failed_index):
    "The gallery and the breakdown on screen say what the records say."
    n_thumbs, n_errors = min(PAGE_SIZE, summary['saved']), min(SAMPLES, summary['failed'])
    counts = page.wait_for_function(
        """([t, e]) => {
            const imgs = [...document.querySelectorAll('.laion-thumb img')];
            const loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
            const errors = document.querySelectorAll('.laion-error-row').length;
            return loaded === t && errors === e && {thumbs: imgs.length, loaded, errors};
        }""", arg=[n_thumbs, n_errors], timeout=WAIT_MS).json_value()
    assert counts == {'thumbs': n_thumbs, 'loaded': n_thumbs, 'errors': n_errors}
    assert page.locator('.laion-thumb').count() == n_thumbs
    n_pages = -(-summary['saved'] // PAGE_SIZE)
    assert page.locator('.laion-page-label').inner_text().strip() == f'page 1 of {n_pages} · {summary["saved"]:,} images'

    def bar_rows(table):
        return {r.get_attribute('data-key'): int(r.get_attribute('data-count'))
                for r in page.locator(f'tr.laion-bar-row[data-table="{table}"]').all()}
    assert bar_rows('outcome') == {'saved': summary['saved'], 'failed': summary['failed']}
    assert bar_rows('type') == summary['by_type']
    assert {k: v for k, v in bar_rows('status').items() if k != 'no response'} == summary['by_status']
    colour = lambda sel: page.locator(sel).first.evaluate('e => getComputedStyle(e).backgroundColor')
    assert colour('tr[data-table="outcome"][data-key="saved"] .laion-bar') == 'rgb(92, 184, 92)'  # green
    assert colour('tr[data-table="outcome"][data-key="failed"] .laion-bar') == 'rgb(217, 83, 79)'  # the error colour
    shown = [int(r.get_attribute('data-index')) for r in page.locator('tr.laion-error-row').all()]
    assert shown == failed_index[:SAMPLES]

    total = summary['attempted']  # the progress panels: one each, though a cell ends with its panel
    page.wait_for_function("t => document.querySelector('.laion-progress-bar')?.innerText.includes(t)",
                           arg=f'{total:,}/{total:,}')
    page.wait_for_function("() => [...document.querySelectorAll('.laion-progress-stats')].some(e => e.innerText.includes('waiting'))")
    assert page.locator('.laion-progress').count() == 2  # all cells have run and shown their outputs by now
    stats = page.locator('.laion-progress-stats').first.inner_text()
    assert f'saved {summary["saved"]:,}' in stats and f'failed {summary["failed"]:,}' in stats, stats
    assert 'elapsed · done' in stats, stats
    tail = page.locator('.laion-progress-stats').last.inner_text()
    assert '2 rows waiting, up to 8 s' in tail, tail
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS/'widgets_browser.png'))


def label(page):
    return page.locator('.laion-page-label').inner_text().strip()


def tiles(page):
    "The rows the gallery shows: index and caption of each tile on screen."
    return [t.split('\n', 1) for t in page.locator('.laion-thumb-info').all_inner_texts()]


def check_controls(page, saved, summary):
    "Pager, search and the breakdown's filter, clicked and typed as a person does; the screen follows."
    n_pages = -(-len(saved) // PAGE_SIZE)
    assert n_pages > 1, 'the demo output must fill more than a page'
    first = tiles(page)
    assert [t[0].split(' · ')[0] for t in first] == [f'#{i}' for i in saved['index'][:PAGE_SIZE]]
    on_page = saved[:PAGE_SIZE]  # the Chinese captions, as text (the screenshot shows them drawn with the CJK font)
    assert [t[1] for t in first if CHINESE in t[1]] == on_page['caption'][on_page['caption'].str.startswith(CHINESE)].tolist() != []
    page.click('.laion-gallery button:has-text("next")')  # a click goes to the kernel and comes back as page 2
    page.wait_for_function("() => document.querySelector('.laion-page-label').innerText.trim().startsWith('page 2 of')")
    page.wait_for_function("n => document.querySelectorAll('.laion-thumb').length === n",
                           arg=min(PAGE_SIZE, len(saved) - PAGE_SIZE))
    page.wait_for_function("i => document.querySelector('.laion-thumb-info').innerText.startsWith(i)",
                           arg=f'#{saved["index"].iloc[PAGE_SIZE]}')
    assert label(page) == f'page 2 of {n_pages} · {len(saved):,} images'
    assert [t[0].split(' · ')[0] for t in tiles(page)] == [f'#{i}' for i in saved['index'][PAGE_SIZE:2 * PAGE_SIZE]]

    query = 'cats'  # typed key by key, no Enter: the search follows the typing
    hits = saved[saved['caption'].str.contains(query, case=False, regex=False)]
    assert 0 < len(hits) < PAGE_SIZE, hits
    page.locator('.laion-search input').press_sequentially(query, delay=60)
    page.wait_for_function("q => document.querySelector('.laion-page-label').innerText.includes(q)", arg=f'“{query}”')
    page.wait_for_function("n => document.querySelectorAll('.laion-thumb').length === n", arg=len(hits))
    assert label(page) == f'page 1 of 1 · {len(hits)} of {len(saved):,} images match “{query}”'
    shown = tiles(page)
    assert [t[0].split(' · ')[0] for t in shown] == [f'#{i}' for i in hits['index']]
    assert all(query in t[1].lower() for t in shown), shown
    assert page.locator('.laion-search input').input_value() == query  # the box kept what was typed
    assert page.locator('.laion-gallery button:has-text("next")').is_disabled()

    select = page.locator('.laion-error-select select')
    labels = [t.replace('\xa0', ' ') for t in select.locator('option').all_inner_texts()]  # widgets use nbsp
    assert labels == [f'all failures ({summary["failed"]:,})'] + [f'{k} ({n:,})' for k, n in summary['by_type'].items()]
    assert select.evaluate('s => s.selectedIndex') == 0
    kind, n = list(summary['by_type'].items())[-1]  # choosing a type lists its rows only
    select.select_option(index=len(labels) - 1)
    page.wait_for_function("n => document.querySelectorAll('.laion-error-row').length === n", arg=min(SAMPLES, n))
    types = [r.locator('td').nth(1).inner_text() for r in page.locator('tr.laion-error-row').all()]
    assert types == [kind] * min(SAMPLES, n), types
    page.screenshot(path=str(ARTIFACTS/'widgets_browser_controls.png'))


def test_gallery_and_breakdown_render_in_jupyterlab(tmp_path, demo_dump):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail('the browser test needs playwright: pip install playwright (a dev dependency)')
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f'{CHROMIUM} not found: run .ci/system-deps (apt-get install chromium)')

    root = tmp_path/'lab'; root.mkdir()
    # 60 demo rows, 30 % failing on the quick failures only: no row waits on a timeout
    if not cjk_font(): pytest.fail('no CJK font: Chinese captions would show as boxes; run .ci/system-deps (fonts-noto-cjk)')
    dump = with_chinese_captions(demo_dump(n=60, fail_share=0.3, failures=demo.BENCH_FAILURES))
    summary, failed_index, saved = expected(dump)
    assert summary['saved'] > 0 and summary['failed'] > 0, summary
    out = make_output(tmp_path/'download', dump)
    assert records.summary(out) == summary  # the records say what the routes promise; the screen must say the same
    shutil.copytree(out, root/'out')
    (root/'widgets_check.ipynb').write_text(json.dumps(notebook('out')))

    port, token = free_port(), secrets.token_hex(16)
    base = f'http://127.0.0.1:{port}'
    env, settings_args = lab_settings(tmp_path/'home')
    log = open(tmp_path/'jupyterlab.log', 'wb')
    lab = subprocess.Popen([sys.executable, '-m', 'jupyter', 'lab', '--no-browser', '--ip=127.0.0.1', f'--port={port}',
                            f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={root}', '--ServerApp.port_retries=0',
                            *settings_args, *(['--allow-root'] if os.geteuid() == 0 else [])],
                           cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_server(f'{base}/api/status?token={token}', lab, tmp_path/'jupyterlab.log')
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path/'chromium-profile'), executable_path=CHROMIUM, headless=True,
                viewport={'width': 1500, 'height': 2600},
                args=['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                      '--disable-component-update', '--no-first-run'])
            try:
                # the page may talk to this JupyterLab only, never to anything beyond 127.0.0.1
                browser.route(re.compile(r'^(?!(http|ws)://127\.0\.0\.1:%d/|data:|blob:)' % port),
                              lambda route: route.abort())
                page = browser.pages[0] if browser.pages else browser.new_page()
                page.set_default_timeout(WAIT_MS)
                try:
                    run_all_cells(page, base, token, 'widgets_check.ipynb')
                    check_widgets(page, summary, failed_index)
                    check_controls(page, saved, summary)
                except Exception:
                    ARTIFACTS.mkdir(exist_ok=True)
                    page.screenshot(path=str(ARTIFACTS/'widgets_browser_failure.png'))
                    raise
            finally:
                browser.close()
    finally:
        stop_server(lab, base, token)
        log.close()
