"""Benchmark: the same download on a Dask LocalCluster (2 worker processes, shards) and with the local default.

Builds a 20,000-row demo dump (10 % quick failures), serves it from the demo image server in its own
process on 127.0.0.1, and downloads it twice into fresh dirs: with `download` (the local default: worker
processes, one per core) and with `download_on_dask` on a LocalCluster of 2 workers, started before the
clock runs. Prints wall time, URLs/s and CPU seconds per URL of each (this process and its children, the
cluster's included), and checks both saved the same rows.

    python bench/bench_scale.py [--rows 20000] [--shard-size 2000] [--latency 0]
"""
import argparse, os, resource, shutil, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_download import DemoServer as Server  # the image server in a process of its own


def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rows', type=int, default=20_000)
    p.add_argument('--shard-size', type=int, default=2_000)
    p.add_argument('--latency', type=float, default=0.0)
    p.add_argument('--threads', type=int, default=64)
    p.add_argument('--worker-threads', type=int, default=2, help='Dask threads per worker: shards run at once on each')
    a = p.parse_args()
    from dask.distributed import Client, LocalCluster
    from laion_nb import records
    from laion_nb.demo import make_demo_dump
    from laion_nb.download import DownloadConfig, download
    from laion_nb.scale import download_on_dask
    tmp = Path(tempfile.mkdtemp(prefix='laion_nb_bench_scale_'))
    try:
        with Server(a.latency) as server:
            dump = make_demo_dump(tmp/'dump', server, n=a.rows, fail_share=0.1, shard_rows=10_000)
            cfg = DownloadConfig.build(metadata=dump, output_dir=tmp/'local', allow_private_networks=True, threads=a.threads,
                                 per_host=a.threads)
            rows = []
            c0, t0 = cpu(), time.monotonic()
            local = download(cfg, progress=None)
            rows.append(('local default (2 processes)', time.monotonic() - t0, cpu() - c0, local))
            # cluster workers are separate processes (not children that have been waited for); their CPU is read from them
            with LocalCluster(n_workers=2, threads_per_worker=a.worker_threads, dashboard_address=':0') as cluster, Client(cluster) as client:
                def worker_cpu():
                    def own():
                        import resource
                        r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime
                    return sum(client.run(own).values())
                w0, c0, t0 = worker_cpu(), cpu(), time.monotonic()
                rep = download_on_dask(DownloadConfig(**{**cfg.__dict__, 'output_dir': tmp/'dask'}), client,
                                       shard_size=a.shard_size, progress=None)
                wall = time.monotonic() - t0
                rows.append((f'LocalCluster, 2 workers x {a.worker_threads} threads, shards of {a.shard_size:,}', wall, cpu() - c0 + worker_cpu() - w0, rep))
        same = records.read_saved(tmp/'local')['index'].tolist() == records.read_saved(tmp/'dask')['index'].tolist()
        print(f'\n{a.rows:,} rows, {a.latency * 1000:.0f} ms latency; same rows saved: {same}\n')
        print('| run | wall s | URLs/s | CPU ms/URL | saved |\n|---|---|---|---|---|')
        for name, wall, c, rep in rows:
            print(f'| {name} | {wall:.1f} | {rep.attempted / wall:.0f} | {c / rep.attempted * 1000:.2f} | {rep.saved:,} |')
        print(f'\noverhead of the cluster run: {rows[1][1] / rows[0][1] - 1:+.0%} wall time')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
