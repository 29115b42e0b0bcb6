"""Benchmark: laion_nb's downloader against img2dataset on the same local image server.

Builds an N-row demo dump (default 5,000, 10 % failing), serves it from the demo image server in its own
process on 127.0.0.1 (0 ms and 100 ms injected latency), and runs each tool as a subprocess, measuring
wall time, CPU seconds (user + system of the whole process tree, see `measure`), peak RSS (sum over the
tree, sampled every 50 ms) and the images saved. img2dataset runs from its own virtualenv (`--peer`), outside the repo.

Outputs are deleted only at the end: on ext4, creating files within a minute or so of deleting many
others makes the kernel scan for recently deleted inodes (seen with `perf`: 10 % of a run's CPU), so a
run right after another's cleanup would pay for it. `--repeat N` alternates the tools N times.

    python bench/bench_download.py --peer /path/to/venv/bin/img2dataset
    python bench/bench_download.py --peer ... --stalls      # with URLs that hang: the run's tail
    python bench/bench_download.py --peer ... --size 1024x768  # photo-sized pictures
    python bench/bench_download.py --rows 100000 --latency 0 --no-peer      # the memory check
    python bench/bench_download.py --rows 2000 --latency 0 --no-peer --profile  # where the Python time goes
    python bench/bench_download.py --latency 0 --size 1024x768 --no-peer --perf  # where all the CPU goes
    python bench/bench_download.py --peer ... --code /path/to/old/checkout     # before against after, in one run
"""
import argparse, multiprocessing as mp, os, shutil, subprocess, sys, tempfile, threading, time
from pathlib import Path
from types import SimpleNamespace


def serve(latency, tls, conn, size=None):
    from laion_nb.demo import VARIANTS, ImageServer, demo_image
    for i in range(VARIANTS):  # encode every picture before any run: else the first tool to run pays for it (measured: ~10 %)
        for fmt in ('jpg', 'png'): demo_image(i, fmt, size)
    with ImageServer(latency=latency, tls=tls) as s:
        conn.send(s.port)
        conn.recv()  # until told to stop


class Server:
    "The demo image server in a process of its own, so its CPU is not counted against either tool."
    def __init__(self, latency, tls=None, size=None):
        self.parent, child = mp.Pipe()
        self.scheme = 'https' if tls else 'http'
        self.proc = mp.get_context('spawn').Process(target=serve, args=(latency, tls, child, size), daemon=True)
    def __enter__(self):
        self.proc.start()
        self.port = self.parent.recv()
        return SimpleNamespace(url=lambda route: f'{self.scheme}://127.0.0.1:{self.port}/{route.lstrip("/")}')
    def __exit__(self, *exc):
        self.parent.send('stop'); self.proc.join(10)
        if self.proc.is_alive(): self.proc.kill()


def tree_pids(pid):
    "`pid` and all its descendants."
    kids = {}
    for d in os.listdir('/proc'):
        if not d.isdigit(): continue
        try: kids.setdefault(int(Path(f'/proc/{d}/stat').read_text().rsplit(')', 1)[1].split()[1]), []).append(int(d))
        except OSError: pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop(); out.append(p); todo += kids.get(p, [])
    return out


def sample_tree(pid, cpu):
    "Resident memory of the tree of `pid` in bytes; records each process's CPU seconds so far in `cpu`."
    total, tck = 0, os.sysconf('SC_CLK_TCK')
    for p in tree_pids(pid):
        try:
            f = Path(f'/proc/{p}/stat').read_text().rsplit(')', 1)[1].split()
            cpu[p] = (int(f[11]) + int(f[12])) / tck
            for line in Path(f'/proc/{p}/status').read_text().splitlines():
                if line.startswith('VmRSS:'): total += int(line.split()[1]) * 1024
        except OSError: pass
    return total


def measure(cmd, env=None):
    """Run `cmd`: wall seconds, CPU seconds of its process tree, peak RSS of the tree (sum over processes).

    CPU is the larger of two readings: rusage of the children that were waited for, and the sum over every
    process seen in the tree of its last CPU reading from /proc (sampled every 50 ms). The second catches
    worker processes that are never waited for, which rusage misses (img2dataset's, measured here)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak, cpu, stop = [0], {}, threading.Event()
    def sample():
        while not stop.wait(0.05): peak[0] = max(peak[0], sample_tree(p.pid, cpu))
    t = threading.Thread(target=sample, daemon=True); t.start()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    stop.set(); t.join()
    err = p.stderr.read().decode(errors='replace')
    if os.waitstatus_to_exitcode(status) != 0: raise RuntimeError(f'{cmd[0]} failed:\n{err[-2000:]}')
    return wall, max(ru.ru_utime + ru.ru_stime, sum(cpu.values())), peak[0]


def count_jpegs(folder):
    return sum(1 for _, _, files in os.walk(folder) for f in files if f.endswith('.jpg'))


def check_saved(folder, sample=200):
    "Every n-th saved file decodes in full as a JPEG of at least 64x64."
    from PIL import Image
    files = sorted(Path(folder).rglob('*.jpg'))
    for f in files[::max(1, len(files) // sample)]:
        im = Image.open(f); im.load()
        assert im.format == 'JPEG' and min(im.size) >= 64, f


def tls_env(a):
    "The environment that makes both tools trust the benchmark's certificate (with --tls)."
    if not a.tls: return None
    return {**os.environ, 'REQUESTS_CA_BUNDLE': a.tls[0], 'SSL_CERT_FILE': a.tls[0], 'CURL_CA_BUNDLE': a.tls[0]}


def make_cert(folder):
    "A self-signed certificate for 127.0.0.1 (the demo URLs' host), made with openssl."
    cert, key = str(folder/'cert.pem'), str(folder/'key.pem')
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-keyout', key, '-out', cert,
                    '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1'], check=True, capture_output=True)
    return cert, key


def ours(dump, out, a, processes=None):
    "The laion_nb command of a run."
    return [sys.executable, '-m', 'laion_nb.download', '--metadata', str(dump), '--output-dir', str(out), '--quiet',
            '--allow-private-networks', '--timeout', str(a.timeout), '--retry', str(a.retries),
            '--processes', str(processes or a.processes), '--threads', str(a.threads), '--per-host', str(a.threads)]


def run_ours(dump, out, a, code=None):
    "A laion_nb run; with `code`, the laion_nb of that source tree (another commit's checkout) instead of this one."
    env = tls_env(a)
    if code: env = {**(env or os.environ), 'PYTHONPATH': str(Path(code).resolve())}
    wall, cpu, rss = measure(ours(dump, out, a), env)
    check_saved(out/'images')
    return wall, cpu, rss, count_jpegs(out/'images')


def run_peer(dump, out, a):
    cmd = [a.peer, '--url_list', str(dump/'metadate'/'metadata_000.parquet'), '--input_format', 'parquet',
           '--url_col', 'url', '--caption_col', 'caption', '--output_format', 'files', '--output_folder', str(out),
           '--processes_count', str(a.processes), '--thread_count', str(a.threads), '--resize_mode', 'no',
           '--timeout', str(a.timeout), '--retries', str(a.retries), '--enable_wandb', 'False']
    env = {**(tls_env(a) or os.environ), 'NO_ALBUMENTATIONS_UPDATE': '1'}
    wall, cpu, rss = measure(cmd, env)
    return wall, cpu, rss, count_jpegs(out)


def profile(dump, out, a):
    """Sample laion_nb (one process) with py-spy and print the functions that take the most time: the GIL holder's, or with
    --native every thread's (waits included: py-spy cannot tell them apart here)."""
    spy = shutil.which('py-spy') or str(Path(sys.executable).parent/'py-spy')
    cmd = ours(dump, out, a, processes=1)
    raw = out.parent/f'{out.name}.txt'
    subprocess.run([spy, 'record', *(['--gil'] if not a.native else ['--native']), '-r', '200', '-f', 'raw', '-o', str(raw), '--', *cmd], check=True, env=tls_env(a),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    own, total, n = {}, {}, 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(' ')
        frames = [f.split(' (')[0] + ' ' + f.rsplit('/', 1)[-1].rstrip(')') for f in stack.split(';')]
        k = int(count); n += k
        own[frames[-1]] = own.get(frames[-1], 0) + k
        for f in set(frames): total[f] = total.get(f, 0) + k
    print(f'{n} on-CPU samples (200/s)\n\ntop by own time:')
    for f, k in sorted(own.items(), key=lambda x: -x[1])[:20]: print(f'{k / n:6.1%}  {f}')
    print('\ntop by total time (with callees):')
    for f, k in sorted(total.items(), key=lambda x: -x[1])[:40]: print(f'{k / n:6.1%}  {f}')


def perf(dump, out, a):
    "Sample every CPU of a laion_nb run (both processes, C libraries and kernel included) with Linux perf; print the shares."
    data = out.parent/f'{out.name}.perf.data'
    subprocess.run(['perf', 'record', '-F', '499', '-o', str(data), '--', *ours(dump, out, a)], check=True, env=tls_env(a),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for key, n in (('dso', 8), ('dso,sym', 15)):
        rep = subprocess.run(['perf', 'report', '-i', str(data), '--no-children', '--sort', key], capture_output=True, text=True).stdout
        print(f'\nCPU samples by {key}:'); print('\n'.join([l for l in rep.splitlines() if l.strip() and not l.startswith('#')][:n]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rows', type=int, default=5000)
    p.add_argument('--fail-share', type=float, default=0.1)
    p.add_argument('--stalls', action='store_true', help='add a URL that stalls past the timeout to the failure mix')
    p.add_argument('--size', default=None, help='WxH of every good picture, e.g. 1024x768 (default: varied, 160x120 to 480x360)')
    p.add_argument('--latency', type=float, nargs='+', default=[0.0, 0.1], help='seconds of injected latency, one run each')
    p.add_argument('--processes', type=int, default=2)
    p.add_argument('--threads', type=int, default=64)
    p.add_argument('--timeout', type=float, default=10)
    p.add_argument('--retries', type=int, default=3)
    p.add_argument('--peer', default=os.environ.get('IMG2DATASET', str(Path.home()/'i2d-venv/bin/img2dataset')),
                   help='the img2dataset executable, in its own virtualenv')
    p.add_argument('--no-peer', action='store_true')
    p.add_argument('--work-dir', default=None, help='where the dumps and outputs go (default: the system temp dir; /dev/shm takes the disk out)')
    p.add_argument('--tls', action='store_true', help='serve HTTPS (a self-signed certificate both tools are told to trust)')
    p.add_argument('--repeat', type=int, default=1, help='runs of each tool per latency, alternating')
    p.add_argument('--code', nargs='+', default=[], metavar='DIR',
                   help='also run laion_nb from these source trees (e.g. a worktree of an older commit), alternating with the rest')
    p.add_argument('--profile', action='store_true', help='profile laion_nb (one process) with py-spy instead')
    p.add_argument('--perf', action='store_true', help='sample laion_nb with Linux perf (C and kernel time included) instead')
    p.add_argument('--native', action='store_true', help='with --profile: all threads with native frames, not only the GIL holder')
    a = p.parse_args()
    from laion_nb.demo import BENCH_FAILURES, make_demo_dump
    failures = BENCH_FAILURES + (['stall/{i}'] if a.stalls else [])
    size = tuple(int(v) for v in a.size.split('x')) if a.size else None
    tmp = Path(tempfile.mkdtemp(prefix='laion_nb_bench_', dir=a.work_dir))
    rows = []
    a.tls = make_cert(tmp) if a.tls else None
    try:
        for latency in a.latency:
            with Server(latency, a.tls, size) as server:
                dump = make_demo_dump(tmp/f'dump-{latency}', server, n=a.rows, fail_share=a.fail_share, shard_rows=10_000,
                                      failures=failures, size=size)
                if a.profile: profile(dump, tmp/f'prof-{latency}', a); continue
                if a.perf: perf(dump, tmp/f'perf-{latency}', a); continue
                tools = [('laion_nb', run_ours)] + [(f'laion_nb@{Path(d).name}', lambda dump, out, a, d=d: run_ours(dump, out, a, d))
                                                    for d in a.code]
                tools += [] if a.no_peer or not Path(a.peer).exists() else [('img2dataset', run_peer)]
                for k, (name, run) in enumerate(tools * a.repeat):
                    out = tmp/f'out-{name.replace("@", "-")}-{latency}-{k}'
                    wall, cpu, rss, saved = run(dump, out, a)
                    rows.append((name, latency, a.rows, wall, a.rows / wall, cpu / a.rows * 1000, rss / 2**20, saved))
                    print(f'{name:12s} {a.size or "mixed":>9s} latency {latency*1000:4.0f} ms: {a.rows / wall:7.1f} URLs/s  {cpu / a.rows * 1000:5.2f} ms CPU/URL  '
                          f'peak RSS {rss / 2**20:6.0f} MB  saved {saved}  ({wall:.1f} s)', flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if rows:
        print('\n| tool | latency | rows | wall s | URLs/s | CPU ms/URL | peak RSS MB | saved |\n|---|---|---|---|---|---|---|---|')
        for r in rows: print(f'| {r[0]} | {r[1]*1000:.0f} ms | {r[2]:,} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.2f} | {r[6]:.0f} | {r[7]:,} |')
        for latency in a.latency:
            names = sorted({r[0] for r in rows if r[0] != 'img2dataset'})
            got = {name: [r for r in rows if r[0] == name and r[1] == latency] for name in names + ['img2dataset']}
            if not got['img2dataset']: continue
            lo = lambda name, i: min(r[i] for r in got[name]); hi = lambda name, i: max(r[i] for r in got[name])
            for name in names:
                if got[name]:
                    print(f'\nlatency {latency*1000:.0f} ms, {name} / img2dataset: URLs/s {lo(name, 4) / hi("img2dataset", 4):.2f}-'
                          f'{hi(name, 4) / lo("img2dataset", 4):.2f}x, CPU per URL {lo(name, 5) / hi("img2dataset", 5):.2f}-'
                          f'{hi(name, 5) / lo("img2dataset", 5):.2f}x')


if __name__ == '__main__':
    main()
