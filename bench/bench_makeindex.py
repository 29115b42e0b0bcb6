"""Benchmark: `makeindex --laion --no-esc50` on 1,000,000 dump rows with 500,000 downloaded images.

Run by hand: `python bench/bench_makeindex.py [--rows N] [--shards K] [--dir DIR] [--runs R]`.

Builds once, in the guide's layout under DIR/data_formal_alin/laion-1m-vit-h-14:
- a dump of N rows in K parquet shards (LAION-like URLs and captions, 1 in 200 captions empty);
- image_paths.jsonl with a record for every even row (N/2 records), written with records.RecordLog;
- images/: one file per record, empty (the index only checks that the file is there, by listing the
  folder, so empty files make that check real without writing 20 GB of JPEGs); 1 in 1000 listed images is
  left out, so some rows take the "file gone, use the URL" path.

Then runs the real `makeindex` console command R times in a fresh process each and prints its wall time
(start-up included) and peak RSS (from wait4), and checks the line counts of laion_train.jsonl.
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_nb.records import RecordLog, Saved


def build(laion: Path, rows: int, shards: int):
    (laion/'metadate').mkdir(parents=True, exist_ok=True)
    (laion/'images').mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    words = np.array('a photo of the red blue cat dog house tree on in with vintage poster art print sale new '
                     'portrait landscape beach city night 猫 café'.split())
    per = rows // shards
    caps_all = []
    for k in range(shards):
        n = per if k < shards - 1 else rows - per * (shards - 1)
        ids = np.arange(k * per, k * per + n)
        caps = [' '.join(words[rng.integers(0, len(words), m)]) for m in rng.integers(3, 25, n)]
        caps = [c if i % 200 else '' for i, c in zip(ids, caps)]
        urls = [f'https://cdn{i % 997}.example.com/images/{i:09d}/photo-{i}.jpg?w=800' for i in ids]
        pq.write_table(pa.table({'url': urls, 'caption': caps, 'similarity': rng.random(n).astype('float32')}),
                       laion/'metadate'/f'metadata_{k:03d}.parquet')
        caps_all += caps
    with RecordLog(laion) as log:
        for i in range(0, rows, 2):
            log.saved(Saved(i, f'images/{i}.jpg', f'https://cdn{i % 997}.example.com/images/{i:09d}/photo-{i}.jpg?w=800',
                            caps_all[i], 640, 480, 48213, f'{i:064x}'))
            if i % 1000: os.close(os.open(laion/'images'/f'{i}.jpg', os.O_WRONLY | os.O_CREAT, 0o644))


def run(data_root: Path, extra: list[str]) -> dict:
    cmd = [str(Path(sys.executable).parent/'makeindex'), '--laion', '--no-esc50', '--data-root', str(data_root), *extra]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    secs = time.perf_counter() - t
    if status: sys.exit(f'makeindex failed with status {status}')
    return {'args': ' '.join(extra) or '(defaults)', 'seconds': round(secs, 2), 'peak_rss_mb': round(usage.ru_maxrss / 1024, 1),
            'report': out.strip()}


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rows', type=int, default=1_000_000)
    ap.add_argument('--shards', type=int, default=10)
    ap.add_argument('--dir', help='where to build (default: a temporary directory; reused when it has the data)')
    ap.add_argument('--runs', type=int, default=2)
    a = ap.parse_args()
    data_root = Path(a.dir or tempfile.mkdtemp())/'data_formal_alin'
    laion = data_root/'laion-1m-vit-h-14'
    if not (laion/'image_paths.jsonl').exists():
        t = time.perf_counter(); build(laion, a.rows, a.shards)
        print(f'built {a.rows:,} rows in {a.shards} shards, {a.rows // 2:,} listed images at {laion} '
              f'in {time.perf_counter() - t:.1f} s', flush=True)
    for extra in [[]] * a.runs + [['--with-index', '--val-ratio', '0.05']]:
        r = run(data_root, extra)
        print(json.dumps({k: v for k, v in r.items() if k != 'report'}), flush=True)
    print(r['report'])
    lines = sum(1 for _ in open(data_root/'laion_train.jsonl', 'rb')) + sum(1 for _ in open(data_root/'laion_val.jsonl', 'rb'))
    expected = a.rows - len(range(0, a.rows, 200))  # rows with an empty caption are skipped
    print(f'lines written: {lines:,} (expected {expected:,})')
    assert lines == expected
