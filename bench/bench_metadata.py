"""Benchmark: stream `index, url, caption` from a 1,000,000-row, 10-shard dump.

Run by hand: `python bench/bench_metadata.py [--rows N] [--shards K] [--dir DIR]`.
Builds the dump once (LAION-like URLs and captions), then streams it in a fresh process
and prints the wall time, rows/s and the peak RSS of that process.
"""
import argparse, json, resource, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def build(root: Path, rows: int, shards: int):
    (root/'metadate').mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = np.array('a photo of the red blue cat dog house tree on in with vintage poster art print sale new '
                     'portrait landscape beach city night'.split())
    per = rows // shards
    for k in range(shards):
        n = per if k < shards - 1 else rows - per * (shards - 1)
        ids = np.arange(k * per, k * per + n)
        lens = rng.integers(3, 25, n)
        caps = [' '.join(words[rng.integers(0, len(words), m)]) for m in lens]
        urls = [f'https://cdn{i % 997}.example.com/images/{i:09d}/photo-{i}.jpg?w=800' for i in ids]
        pq.write_table(pa.table({'url': urls, 'caption': caps, 'similarity': rng.random(n).astype('float32')}),
                       root/'metadate'/f'metadata_{k:03d}.parquet')


def stream(root: str):
    from laion_nb.metadata import Dump
    t = time.perf_counter()
    dump, n, chars = Dump(root), 0, 0
    for df in dump.batches(columns=('index', 'url', 'caption')):
        n += len(df); chars += int(df['url'].str.len().sum())
    secs = time.perf_counter() - t
    print(json.dumps({'rows': n, 'seconds': round(secs, 2), 'rows_per_s': round(n / secs),
                      'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rows', type=int, default=1_000_000)
    ap.add_argument('--shards', type=int, default=10)
    ap.add_argument('--dir', help='where to build the dump (default: a temporary directory)')
    ap.add_argument('--stream', help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.stream: stream(a.stream); sys.exit()
    root = Path(a.dir or tempfile.mkdtemp())/'bench-dump'
    if not (root/'metadate').exists():
        t = time.perf_counter(); build(root, a.rows, a.shards)
        print(f'built {a.rows:,} rows in {a.shards} shards at {root} in {time.perf_counter() - t:.1f} s')
    for _ in range(3): subprocess.run([sys.executable, __file__, '--stream', str(root)], check=True)
