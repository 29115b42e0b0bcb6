"""Benchmark: open the widgets on a 1,000,000-row output dir.

Run by hand: `python bench/bench_widgets.py [--rows N] [--dir DIR]`.
Builds the output once (LAION-like captions and URLs, a handful of real JPEGs, 10 % of rows failed),
then, in a fresh process, times `records.read_saved` alone, opening a `Gallery` (read + first page of
thumbnails), turning a page, a caption search, a random sample, `ErrorBreakdown` and 1,000,000
`LiveProgress.update` calls, and prints them with the peak RSS.
"""
import argparse, json, resource, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np
from PIL import Image


def build(out: Path, rows: int):
    from laion_nb import records
    (out/'images').mkdir(parents=True, exist_ok=True)
    for k in range(8):
        Image.effect_mandelbrot((640, 480), (-2 + k * 0.1, -1.2, 1, 1.2), 60).convert('RGB').save(out/'images'/f'{k}.jpg')
    rng = np.random.default_rng(0)
    words = np.array('a photo of the red blue cat dog house tree on in with vintage poster art print sale new '
                     'portrait landscape beach city night'.split())
    kinds = ['http_status', 'timeout', 'dns', 'connect', 'not_image', 'too_small', 'reset']
    saved, failed = [], []
    for i in range(rows):
        url = f'https://cdn{i % 997}.example.com/images/{i:09d}/photo-{i}.jpg?w=800'
        if i % 10 == 0:
            kind = kinds[(i // 10) % len(kinds)]
            failed.append(json.dumps({'index': i, 'url': url, 'error_type': kind,
                                      'status': 404 if kind == 'http_status' else None,
                                      'message': f'{kind} happened', 'attempts': 1 + (i % 4)}) + '\n')
        else:
            cap = ' '.join(words[rng.integers(0, len(words), 8)])
            saved.append(json.dumps({'index': i, 'path': f'images/{i % 8}.jpg', 'url': url, 'caption': cap,
                                     'width': 640, 'height': 480, 'bytes': 50000, 'sha256': '0' * 64}) + '\n')
    (out/records.SAVED_FILE).write_text(''.join(saved))
    (out/records.FAILED_LOG).write_text(''.join(failed))


def measure(out: str):
    from laion_nb import records
    from laion_nb.widgets import ErrorBreakdown, Gallery, LiveProgress
    times = {}

    def timed(name, f):
        t = time.perf_counter(); r = f(); times[name] = round(time.perf_counter() - t, 3); return r
    timed('read_saved', lambda: records.read_saved(out))
    g = timed('gallery_open', lambda: Gallery(out))
    timed('next_page', g.next_page)
    timed('search', lambda: g.search('red cat'))
    timed('random_sample', g.random_sample)
    timed('error_breakdown', lambda: ErrorBreakdown(out))
    p = LiveProgress(show=False); p.start(1_000_000)
    rec = records.Saved(0, 'images/0.jpg', 'u', 'c', 1, 1, 1, '')
    timed('live_progress_1m_updates', lambda: [p.update(rec) for _ in range(1_000_000)])
    p.close()
    print(json.dumps({'rows': len(g.saved) + ErrorBreakdown(out).summary['failed'], **times,
                      'thumbs_made': g.thumbs_made, 'progress_draws': p.draws,
                      'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--rows', type=int, default=1_000_000)
    ap.add_argument('--dir', type=Path, default=None)
    ap.add_argument('--measure', help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure: measure(a.measure); sys.exit()
    out = a.dir or Path(tempfile.mkdtemp())/'out'
    if not (out/'image_paths.jsonl').exists(): build(out, a.rows)
    subprocess.run([sys.executable, __file__, '--measure', str(out)], check=True)
