"""Benchmark: the driver's memory and time to resume and to finalize a run on a store, as the number of records grows.

Synthesises a run's records straight into a LOCAL `Store` (a folder: no network, so what is measured is the
reading): `PartWriter`s of 500 records a part, shards of 50,000 rows, ~5 % failures (404s and timeouts), and
duplicates as a real run leaves them (every 1,000th row failed with a timeout in one part, saved in a later
one; every 2,000th row saved twice). Each saved row gets an empty `images/{index}.jpg`, so the image listing
is the real one. Then, in a fresh Python process per N and per call, it measures the peak RSS
(`getrusage(RUSAGE_SELF).ru_maxrss`) and the wall time of `resume(store)` and of `finalize(store)`, and the
peak RSS after the imports alone (the base). The slope is the growth of the peak from one N to the next, per
added row: what a bigger run costs the driver.

    python bench/bench_store_memory.py [--rows 200000 500000 1000000] [--dir /tmp/store-mem]

The code measured is the `laion_nb` the subprocess imports: `PYTHONPATH=/work/main python bench/...` measures
main's. The synthetic store is built once per N (by whichever code runs the script: the part format of either
reads back in both) and kept in `--dir` for the next run.
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path

SHARD_ROWS, EVERY = 50_000, 500


def build(root:Path, n:int):
    "The records of a run of `n` rows on the local store `root`, and an empty image per saved row."
    from laion_nb.records import Failed, Saved
    from laion_nb.store import PartWriter, Store
    store = Store(root)
    (root/'images').mkdir(parents=True, exist_ok=True)
    sv = lambda i: Saved(i, f'images/{i}.jpg', f'https://img{i % 5000}.example.com/photos/{i}.jpg', f'a photo of thing number {i} on a table',
                         256, 192, 12345, f'{i:064x}', 1024, 768)
    fl = lambda i, kind, status: Failed(i, f'https://img{i % 5000}.example.com/photos/{i}.jpg', kind, status, f'{kind} {status}', 1)
    for lo in range(0, n, SHARD_ROWS):
        later = []
        with PartWriter(store, f'{lo // SHARD_ROWS:05d}', every=EVERY, seconds=3600) as w:
            for i in range(lo, min(lo + SHARD_ROWS, n)):
                if i % 20 == 7: w.failed(fl(i, 'http_status', 404)); continue
                if i % 1000 == 3: w.failed(fl(i, 'timeout', None)); later.append(i); continue
                os.close(os.open(root/'images'/f'{i}.jpg', os.O_CREAT | os.O_WRONLY, 0o644))
                w.saved(sv(i))
                if i % 2000 == 11: later.append(i)
            for i in later:  # the retried timeouts saved, and a few rows saved twice, in the shard's later parts
                os.close(os.open(root/'images'/f'{i}.jpg', os.O_CREAT | os.O_WRONLY, 0o644))
                w.saved(sv(i))
    (root/'.built').write_text(str(n))


def measure(root:str, what:str):
    "Run `resume` or `finalize` on the store `root` in this (fresh) process; print the peak RSS (MB) and the seconds taken."
    import resource
    import numpy, pyarrow, pyarrow.json, pyarrow.parquet  # noqa: F401  (imports both versions need: the base)
    from laion_nb import store as st
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    out = st.resume(root) if what == 'resume' else st.finalize(root)
    took = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    counts = {'done': len(out.done)} if what == 'resume' else {k: out[k] for k in ('saved', 'failed')}
    print(json.dumps({'base_mb': round(base), 'peak_mb': round(peak), 'seconds': round(took, 2), **counts}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--rows', type=int, nargs='+', default=[200_000, 500_000, 1_000_000])
    ap.add_argument('--dir', default='/tmp/store-mem')
    ap.add_argument('--measure', nargs=2, metavar=('WHAT', 'ROOT'), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure: return measure(a.measure[1], a.measure[0])
    import laion_nb
    print(f'laion_nb from {Path(laion_nb.__file__).parent}')
    print(f'{"N":>9} {"call":>9} {"base MB":>8} {"peak MB":>8} {"MB over base":>12} {"slope B/row":>11} {"seconds":>8}  counts')
    last = {}  # call -> (N, peak MB) of the previous N: the slope is the growth of the peak per added row
    for n in a.rows:
        root = Path(a.dir)/f'n{n}'
        if not (root/'.built').exists():
            t = time.perf_counter(); build(root, n); print(f'  (built {n:,} rows in {time.perf_counter() - t:.0f} s)', flush=True)
        for what in ('resume', 'finalize'):
            r = subprocess.run([sys.executable, __file__, '--measure', what, str(root)], capture_output=True, text=True, env=os.environ)
            if r.returncode: print(r.stderr); raise SystemExit(r.returncode)
            m = json.loads(r.stdout.strip().splitlines()[-1])
            over, (n0, p0) = m['peak_mb'] - m['base_mb'], last.get(what, (None, None))
            slope = f'{(m["peak_mb"] - p0) * 2**20 / (n - n0):.0f}' if n0 else '-'
            last[what] = (n, m['peak_mb'])
            counts = {k: v for k, v in m.items() if k not in ('base_mb', 'peak_mb', 'seconds')}
            print(f'{n:>9,} {what:>9} {m["base_mb"]:>8} {m["peak_mb"]:>8} {over:>12} {slope:>11} {m["seconds"]:>8}  {counts}', flush=True)


if __name__ == '__main__': main()
