"""Benchmark: one dump downloaded to local files, to local WebDataset tars and to an S3 API (moto's server), in-process and on Dask.

Builds a demo dump (default 20,000 rows, 10 % quick failures) whose URLs point at the benchmark's image server
(bench_server.BenchServer, its own process, latency 0 by default), starts moto's S3 server in a process of its own
on 127.0.0.1 (so its CPU and memory are not the run's), and downloads the dump six times into fresh outputs:

    local files | local WebDataset | s3://bench/files   x   download() here (LocalExecutor: a worker process per core)
                                                            | a LocalCluster of 2 worker processes (DaskExecutor)

Prints wall time, URLs/s, rows saved, the S3 server's CPU seconds, and the peak resident memory of each worker process (sampled every 0.1 s:
the LocalExecutor's worker processes, or the Dask workers) and of this process (the driver). Each run is checked
to save the same rows as the first.

    python bench/bench_store.py [--rows 20000] [--shard-size 2000] [--latency 0] [--threads 64]
"""
import argparse, os, shutil, socket, subprocess, sys, tempfile, threading, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_server import BenchServer, cpu_seconds  # noqa: E402


def free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


class Moto:
    "moto's S3 server in a process of its own on 127.0.0.1, and the environment a user sets for it."
    def __enter__(self):
        port = free_port()
        self.proc = subprocess.Popen([sys.executable, '-m', 'moto.server', '-H', '127.0.0.1', '-p', str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.endpoint = f'http://127.0.0.1:{port}'
        os.environ.update(AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID='bench', AWS_SECRET_ACCESS_KEY='bench',
                          AWS_DEFAULT_REGION='us-east-1')
        deadline = time.monotonic() + 30
        while True:
            try: socket.create_connection(('127.0.0.1', port), timeout=1).close(); break
            except OSError:
                if time.monotonic() > deadline: raise RuntimeError('moto server did not start')
                time.sleep(0.1)
        return self

    def __exit__(self, *exc): self.proc.kill(); self.proc.wait()


class PeakRSS:
    "Samples the resident memory of this process and its descendants (less `skip`) every `every` seconds; the peak of each."
    def __init__(self, skip=(), every=0.1): self.skip, self.every, self.peak, self.stop = set(skip), every, {}, threading.Event()

    def __enter__(self):
        import psutil
        me = psutil.Process()
        def sample():
            while not self.stop.is_set():
                for p in [me, *me.children(recursive=True)]:
                    if p.pid in self.skip: continue
                    try: rss, name = p.memory_info().rss, ' '.join(p.cmdline()[:6])
                    except (psutil.Error, OSError): continue
                    old = self.peak.get(p.pid, (0, ''))
                    if rss > old[0]: self.peak[p.pid] = (rss, name)
                self.stop.wait(self.every)
        self.thread = threading.Thread(target=sample, daemon=True); self.thread.start()
        return self

    def __exit__(self, *exc): self.stop.set(); self.thread.join()

    def workers(self, dask:bool) -> list:
        "Peak MB of each worker process: the Dask workers (not their nannies), or the LocalExecutor's spawned workers."
        me = os.getpid()
        if dask: found = [r for pid, (r, n) in self.peak.items() if pid != me and 'spawn_main' in n and 'nanny' not in n.lower()]
        else: found = [r for pid, (r, n) in self.peak.items() if pid != me and 'spawn_main' in n]
        return sorted((r / 2**20 for r in found), reverse=True)

    def driver(self) -> float: return self.peak.get(os.getpid(), (0, ''))[0] / 2**20


def saved_rows(out):
    "The saved indices of a finished run at `out` (a folder or a URL), from its image_paths.jsonl."
    import json
    from laion_nb.store import open_store
    data = open_store(str(out)).get('image_paths.jsonl').decode()
    return sorted(json.loads(l)['index'] for l in data.splitlines())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rows', type=int, default=20_000)
    p.add_argument('--shard-size', type=int, default=2_000, help='rows per Dask shard (and samples per tar of a local run)')
    p.add_argument('--latency', type=float, default=0.0)
    p.add_argument('--threads', type=int, default=64)
    p.add_argument('--worker-threads', type=int, default=2, help='Dask threads per worker: shards run at once on each')
    a = p.parse_args()
    import s3fs
    from dask.distributed import Client, LocalCluster
    from laion_nb.demo import make_demo_dump
    from laion_nb.download import DownloadConfig, download
    from laion_nb.pool import LocalExecutor
    from laion_nb.scale import DaskExecutor
    tmp = Path(tempfile.mkdtemp(prefix='laion_nb_bench_store_'))
    rows, first = [], None
    try:
        with BenchServer(a.latency, formats=('jpg', 'png')) as server, Moto() as moto:
            dump = make_demo_dump(tmp/'dump', server, n=a.rows, fail_share=0.1, shard_rows=10_000)
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir('bench')
            skip = {moto.proc.pid, *(q.pid for q in server.procs)}
            targets = [('local files', str(tmp/'{ex}-files'), 'files'), ('local WebDataset', str(tmp/'{ex}-wds'), 'webdataset'),
                       ('S3 (moto) files', 's3://bench/{ex}-files', 'files'), ('S3 (moto) WebDataset', 's3://bench/{ex}-wds', 'webdataset')]
            for ex in ('local', 'dask'):
                cluster = client = None
                if ex == 'dask':  # started before the clock runs, as a user's cluster is there before the run
                    cluster = LocalCluster(n_workers=2, threads_per_worker=a.worker_threads, dashboard_address=':0')
                    client = Client(cluster)
                try:
                    for name, out, fmt in targets:
                        cfg = DownloadConfig.build(metadata=dump, output_dir=out.format(ex=ex), output_format=fmt, allow_private_networks=True,
                                                   threads=a.threads, per_host=a.threads)
                        executor = DaskExecutor(client, a.shard_size) if ex == 'dask' else LocalExecutor(a.shard_size)
                        m0 = cpu_seconds(moto.proc.pid)
                        with PeakRSS(skip) as mem:
                            t0 = time.monotonic(); rep = download(cfg, progress=None, executor=executor); wall = time.monotonic() - t0
                        moto_cpu = cpu_seconds(moto.proc.pid) - m0
                        got = saved_rows(cfg.output_dir)
                        first = first or got
                        label = 'LocalCluster 2 workers' if ex == 'dask' else 'download() here'
                        rows.append((name, label, wall, rep, mem.workers(ex == 'dask'), mem.driver(), got == first, moto_cpu))
                        print(f'{name}, {label}: {wall:.1f} s', file=sys.stderr)
                finally:
                    if client is not None: client.close(); cluster.close()
        print(f'\n{a.rows:,} rows, {a.latency * 1000:.0f} ms latency, {os.cpu_count()} cores, threads {a.threads}, '
              f'shards/tars of {a.shard_size:,}\n')
        print('| output | executor | wall s | URLs/s | saved | peak RSS per worker (MB) | driver RSS (MB) | S3 server CPU s | same rows |\n|---|---|---|---|---|---|---|---|---|')
        for name, label, wall, rep, workers, driver, same, moto_cpu in rows:
            w = ', '.join(f'{m:.0f}' for m in workers) or '-'
            print(f'| {name} | {label} | {wall:.1f} | {rep.attempted / wall:,.0f} | {rep.saved:,} | {w} | {driver:.0f} | {moto_cpu:.1f} | {same} |')
        print('\nthe S3 server is moto, one Python process on these same cores (a PUT per image in the files layout):'
              ' read the S3 rows against its CPU seconds, not as what S3 itself would give')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
