"""Benchmark: laion_nb's downloader against img2dataset on the same local image server.

Builds an N-row dump (default 5,000, 10 % failing: 404s, HTML, tiny, truncated and garbage images, redirect loops,
resets, 500s), serves it from a small asyncio server (`bench_server.py`) in processes of their own on 127.0.0.1, and
runs each tool as a subprocess, measuring wall time, CPU seconds (user + system of the whole process tree, see
`measure`), peak RSS (sum over the tree, sampled every 50 ms) and the images saved; and the server's own CPU per URL,
so readers see it is not the bottleneck. img2dataset runs from its own virtualenv (`--peer`), outside the repo.

Two shapes of dump:
- `--shape loopback` (default): every URL on one host, 127.0.0.1, kept alive; pictures .jpg, every tenth .png.
- `--shape web`: the real web's shape. `--hosts` names (default rows / 2, the ratio of real LAION rows) under
  `.bench.test`, Zipf-spread like LAION's (a few big CDNs with many rows, a long tail with one or two), each its own
  pool in both tools, so every new host pays a new TCP (and TLS) connection; `--https-share` of the rows (default 0.63)
  on HTTPS with a wildcard certificate from a local CA made with the openssl CLI, which both tools are told to trust
  the standard way (SSL_CERT_FILE, REQUESTS_CA_BUNDLE; a P-256 key, `--cert-key rsa` for RSA 2048); formats as the URL's extension says (~90 % .jpg, then .png,
  .webp, .gif). The names resolve to 127.0.0.1 through a generated `sitecustomize.py` on PYTHONPATH that wraps
  `socket.getaddrinfo` in every Python process of both tools (their worker processes inherit PYTHONPATH); no
  system file is touched. Default latencies 0.1 s and 1 s, resize off and 384.

Each shape (latency x resize) runs `--repeat N` alternating pairs; the table gives per run URLs/s, CPU ms/URL, peak RSS,
images saved, server CPU ms/URL and requests per URL, and per pair the ratios (speed ours/theirs, CPU theirs/ours). A
sample of 200 images each tool saved is decoded in full (`Image.open().load()`) and checked against the resize
target; misses are printed. laion_nb runs with its own defaults for threads and processes unless `--threads` or
`--processes` are given; img2dataset with `--peer-threads` (default 256, its own default) and `--peer-processes` (2).

Outputs are deleted only at the end: on ext4, creating files within a minute or so of deleting many
others makes the kernel scan for recently deleted inodes (seen with `perf`: 10 % of a run's CPU), so a
run right after another's cleanup would pay for it.

    python bench/bench_download.py --shape web --repeat 3                  # the real web's shape: 0.1 s and 1 s, resize off and 384
    python bench/bench_download.py --shape web --rows 1000 --repeat 1 --latency 0.1 --resize 0 384  # a quick look
    python bench/bench_download.py --shape web --threads 256 --peer-threads 256 --peer-processes 2  # other thread counts
    python bench/bench_download.py --repeat 3                               # one host, kept alive, 0 and 100 ms
    python bench/bench_download.py --stalls      # with URLs that hang: the run's tail
    python bench/bench_download.py --size 1024x768  # photo-sized pictures
    python bench/bench_download.py --tls          # one host over HTTPS
    python bench/bench_download.py --rows 200000 --latency 0 --no-peer      # the memory check (also --rows 1000000)
    python bench/bench_download.py --rows 2000 --latency 0 --no-peer --profile  # where the Python time goes
    python bench/bench_download.py --latency 0 --size 1024x768 --no-peer --perf  # where all the CPU goes
    python bench/bench_download.py --code /path/to/old/checkout     # before against after, in one run
    python bench/bench_download.py --demo-server ...   # the demo's threaded server instead (as the older numbers were)
"""
import argparse, json, multiprocessing as mp, os, random, shutil, subprocess, sys, tempfile, threading, time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import BenchServer, FORMATS  # noqa: E402

SUFFIX = 'bench.test'
WEB_FORMATS = {'jpg': 0.90, 'png': 0.05, 'webp': 0.03, 'gif': 0.02}  # of the good rows, by URL extension


# ---------- the demo's threaded server (--demo-server), as the older numbers were measured ----------
def serve_demo(latency, tls, conn, size=None):
    from laion_nb.demo import VARIANTS, ImageServer, demo_image
    for i in range(VARIANTS):  # encode every picture before any run: else the first tool to run pays for it (measured: ~10 %)
        for fmt in ('jpg', 'png'): demo_image(i, fmt, size)
    with ImageServer(latency=latency, tls=tls) as s:
        conn.send((s.port, os.getpid()))
        conn.recv()  # until told to stop


class DemoServer:
    "The demo image server in a process of its own, so its CPU is not counted against either tool."
    def __init__(self, latency, tls=None, size=None):
        self.parent, child = mp.Pipe()
        self.scheme = 'https' if tls else 'http'
        self.proc = mp.get_context('spawn').Process(target=serve_demo, args=(latency, tls, child, size), daemon=True)
    def __enter__(self):
        self.proc.start()
        self.port, pid = self.parent.recv()
        from bench_server import cpu_seconds
        return SimpleNamespace(url=lambda route: f'{self.scheme}://127.0.0.1:{self.port}/{route.lstrip("/")}',
                               cpu=lambda: cpu_seconds(pid), requests=lambda: float('nan'))
    def __exit__(self, *exc):
        self.parent.send('stop'); self.proc.join(10)
        if self.proc.is_alive(): self.proc.kill()


# ---------- measuring a process tree ----------
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
    err = []
    drain = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True); drain.start()  # a full pipe would block the tool
    def sample():
        while not stop.wait(0.05): peak[0] = max(peak[0], sample_tree(p.pid, cpu))
    t = threading.Thread(target=sample, daemon=True); t.start()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    stop.set(); t.join(); drain.join(5)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f'{cmd[0]} failed:\n{b"".join(err).decode(errors="replace")[-2000:]}')
    return wall, max(ru.ru_utime + ru.ru_stime, sum(cpu.values())), peak[0]


# ---------- names, certificates, dumps ----------
def make_tls(folder, kind='ec'):
    """A local CA and a certificate it signs for *.bench.test, bench.test and 127.0.0.1, made with the openssl CLI: (ca, (cert, key)).

    `kind` 'ec' (P-256, as the big CDNs serve) or 'rsa' (2048 bit): an RSA signature costs the server about 1 ms of CPU per
    handshake, which on a small machine it takes from the tools."""
    folder = Path(folder); run = lambda *c: subprocess.run(c, check=True, capture_output=True, cwd=folder)
    new = ['-newkey', 'rsa:2048'] if kind == 'rsa' else ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1']
    run('openssl', 'req', '-x509', *new, '-nodes', '-days', '2', '-keyout', 'ca.key', '-out', 'ca.pem',
        '-subj', '/CN=laion_nb bench CA', '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign')
    run('openssl', 'req', *new, '-nodes', '-keyout', 'key.pem', '-out', 'leaf.csr', '-subj', f'/CN=*.{SUFFIX}')
    (folder/'leaf.ext').write_text(f'subjectAltName=DNS:*.{SUFFIX},DNS:{SUFFIX},IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n'
                                   'keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n'
                                   'subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n')
    run('openssl', 'x509', '-req', '-in', 'leaf.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-days', '2',
        '-out', 'cert.pem', '-extfile', 'leaf.ext')
    return str(folder/'ca.pem'), (str(folder/'cert.pem'), str(folder/'key.pem'))


SITECUSTOMIZE = f'''"Benchmark only: names under .{SUFFIX} resolve to 127.0.0.1 (generated by bench/bench_download.py)."
import socket
_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *args, **kw):
    h = host.decode() if isinstance(host, bytes) else host
    if isinstance(h, str) and (h == {SUFFIX!r} or h.endswith({"." + SUFFIX!r})): host = '127.0.0.1'
    return _getaddrinfo(host, *args, **kw)
socket.getaddrinfo = getaddrinfo
'''


def make_site(folder):
    "A folder with the `sitecustomize.py` that maps *.bench.test to 127.0.0.1, for PYTHONPATH."
    d = Path(folder)/'site'; d.mkdir(parents=True, exist_ok=True)
    (d/'sitecustomize.py').write_text(SITECUSTOMIZE)
    return str(d)


def zipf_counts(rows, hosts, s=1.0):
    "Rows per host, largest first: about A / k**s for the k-th host, at least 1, summing to `rows`."
    hosts = max(1, min(hosts, rows)); k = np.arange(1, hosts + 1, dtype=np.float64) ** s
    counts = lambda A: np.maximum(1, np.rint(A / k)).astype(np.int64)
    lo, hi = 0.0, float(rows)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if counts(mid).sum() < rows else (lo, mid)
    c = counts(hi); c[0] += rows - c.sum()  # the rounding's remainder goes to the biggest host
    return c


def web_urls(server, rows, hosts, https_share=0.63, fail_share=0.1, failures=(), seed=0, zipf=1.0):
    "The URLs of a web-shaped dump and a summary of their spread: hosts, their schemes, formats by extension, failures."
    rng = random.Random(seed)
    counts = zipf_counts(rows, hosts, zipf)
    names = [f'cdn{k}.{SUFFIX}' if k < 20 else f'www-site{k}.{SUFFIX}' for k in range(len(counts))]
    order = list(range(len(counts))); rng.shuffle(order)  # hosts in random order take HTTPS until the rows reach the share
    https, done = set(), 0
    for k in order:  # a host goes HTTPS when that brings the rows closer to the share
        if abs(done + counts[k] - https_share * rows) < abs(done - https_share * rows): https.add(k); done += counts[k]
    row_host = np.repeat(np.arange(len(counts)), counts); np.random.default_rng(seed).shuffle(row_host)
    fmts, weights = list(WEB_FORMATS), list(WEB_FORMATS.values())
    urls, kinds, f = [], Counter(), 0
    for i, k in enumerate(row_host.tolist()):
        if rng.random() < fail_share: route = failures[f % len(failures)].format(i=i); f += 1; kinds['failing'] += 1
        else: fmt = rng.choices(fmts, weights)[0]; route = f'img/{i}.{fmt}'; kinds[fmt] += 1
        urls.append(server.url(route, names[k], k in https))
    summary = (f'{len(counts):,} hosts for {rows:,} rows (Zipf s={zipf}): top 10 hosts have {", ".join(map(str, counts[:10]))} rows '
               f'({counts[:10].sum() / rows:.0%}); {np.mean(counts == 1):.0%} of hosts have 1 row, {np.mean(counts <= 2):.0%} 1 or 2; '
               f'HTTPS: {done / rows:.0%} of rows, {len(https) / len(counts):.0%} of hosts; '
               + ', '.join(f'{k} {v / rows:.1%}' for k, v in kinds.most_common()))
    return urls, summary


def write_dump(root, urls, shard_rows=100_000):
    "A dump of `urls` in the guide's layout (metadata only: neither tool reads the embeddings to download), written fast."
    import pyarrow as pa, pyarrow.parquet as pq
    words = ('a red barn', 'two cats on a sofa', 'mountain lake at dawn', 'street food in Hà Nội', 'café au lait', 'sunflowers')
    (Path(root)/'metadate').mkdir(parents=True, exist_ok=True)
    for k, lo in enumerate(range(0, len(urls), shard_rows)):
        hi = min(len(urls), lo + shard_rows)
        t = pa.table({'url': urls[lo:hi], 'caption': [f'{words[i % len(words)]} #{i}' for i in range(lo, hi)],
                      'key': [f'{i:09d}' for i in range(lo, hi)]})
        pq.write_table(t, Path(root)/'metadate'/f'metadata_{k:03d}.parquet', row_group_size=min(hi - lo, 10_000))
    return Path(root)


# ---------- the tools ----------
def tool_env(a, code=None, peer=False):
    "The environment of a tool's processes: the CA to trust, the name map on PYTHONPATH, and laion_nb's source tree."
    env = dict(os.environ)
    if a.ca: env.update(REQUESTS_CA_BUNDLE=a.ca, SSL_CERT_FILE=a.ca, CURL_CA_BUNDLE=a.ca)
    path = [] if peer else [str(Path(code).resolve())] if code else [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p]
    if a.site: path.insert(0, a.site)
    if path: env['PYTHONPATH'] = os.pathsep.join(path)
    else: env.pop('PYTHONPATH', None)
    if peer: env['NO_ALBUMENTATIONS_UPDATE'] = '1'
    return env


def compile_trees(a):
    """Compile laion_nb's sources to bytecode, as `pip install` does (img2dataset's came compiled with its wheel): else, with
    PYTHONDONTWRITEBYTECODE set, each of our processes would compile every module at its start."""
    import compileall, importlib.util
    trees = [Path(d)/'laion_nb' for d in a.code] + [Path(importlib.util.find_spec('laion_nb').origin).parent]
    for t in trees: compileall.compile_dir(str(t), quiet=1)


def ours(dump, out, a, resize, processes=None):
    "The laion_nb command of a run: its own defaults for threads and processes unless given."
    cmd = [sys.executable, '-m', 'laion_nb.download', '--metadata', str(dump), '--output-dir', str(out), '--quiet',
           '--allow-private-networks', '--timeout', str(a.timeout), '--retry', str(a.retries)]
    if processes or a.processes: cmd += ['--processes', str(processes or a.processes)]
    if a.threads: cmd += ['--threads', str(a.threads)]
    if a.per_host or a.shape == 'loopback': cmd += ['--per-host', str(a.per_host or a.threads or 4096)]  # one host: no per-host limit
    if resize: cmd += ['--resize', str(resize)]
    return cmd


def peer(dump, out, a, resize):
    "The img2dataset command of a run."
    return [a.peer, '--url_list', str(dump/'metadate'), '--input_format', 'parquet',
            '--url_col', 'url', '--caption_col', 'caption', '--output_format', 'files', '--output_folder', str(out),
            '--processes_count', str(a.peer_processes), '--thread_count', str(a.peer_threads), '--encode_format', 'jpg',
            *(['--resize_mode', 'keep_ratio_largest', '--image_size', str(resize), '--resize_only_if_bigger', 'True']
              if resize else ['--resize_mode', 'no']),
            '--timeout', str(a.timeout), '--retries', str(a.retries), '--enable_wandb', 'False']


def check_saved(folder, resize=None, sample=200, min_side=64):
    "Decode a sample of the saved .jpg files in full; the misses: not a JPEG, not decodable, under `min_side`, over `resize`."
    from PIL import Image
    files = sorted(Path(folder).rglob('*.jpg')) if Path(folder).exists() else []
    misses = []
    for f in files[::max(1, len(files) // sample)]:
        try:
            with Image.open(f) as im:
                im.load()
                if im.format != 'JPEG': misses.append(f'{f.name}: {im.format}')
                elif min_side and min(im.size) < min_side: misses.append(f'{f.name}: {im.size} under {min_side} px')
                elif resize and max(im.size) > resize: misses.append(f'{f.name}: {im.size} over {resize} px')
        except Exception as e: misses.append(f'{f.name}: {type(e).__name__}: {e}')
    return len(files), misses


def our_errors(out):
    "laion_nb's failures of a run by error type, from its append-only log."
    log = Path(out)/'download_errors.jsonl'
    if not log.exists(): return Counter()
    return Counter(json.loads(l).get('error_type') for l in log.read_text().splitlines() if l.strip())


def run_tool(name, dump, out, a, resize, server, code=None):
    "One run of a tool: its measures, what it saved, and the server's CPU and requests while it ran."
    is_peer = name == 'img2dataset'
    cmd = peer(dump, out, a, resize) if is_peer else ours(dump, out, a, resize)
    cpu0, req0 = server.cpu(), server.requests()
    wall, cpu, rss = measure(cmd, tool_env(a, code, peer=is_peer))
    scpu, sreq = server.cpu() - cpu0, server.requests() - req0
    saved, misses = check_saved(out if is_peer else out/'images', resize, min_side=0 if is_peer else 64)
    n = a.rows
    return SimpleNamespace(name=name, wall=wall, speed=n / wall, cpu=cpu / n * 1000, rss=rss / 2**20, saved=saved, misses=misses,
                           server=scpu / n * 1000, server_busy=scpu / wall, server_procs=getattr(server, 'n', 1), requests=sreq / n,
                           errors=None if is_peer else our_errors(out))


def check_peer_trust(a, url):
    "img2dataset's urllib verifies the certificate: it fetches `url` when told to trust the CA, and refuses it when not."
    py = str(Path(a.peer).parent/'python')
    code = 'import sys, urllib.request as u\ntry: u.urlopen(sys.argv[1], timeout=5).read(); print("ok")\nexcept Exception as e: print(type(e).__name__, e)'
    got = subprocess.run([py, '-c', code, url], env=tool_env(a, peer=True), capture_output=True, text=True).stdout.strip()
    bare = {k: v for k, v in tool_env(a, peer=True).items() if k not in ('SSL_CERT_FILE', 'REQUESTS_CA_BUNDLE', 'CURL_CA_BUNDLE')}
    without = subprocess.run([py, '-c', code, url], env=bare, capture_output=True, text=True).stdout.strip()
    print(f'img2dataset trust check on {url}: with the CA: {got}; without: {without[:90]}')
    if got != 'ok' or 'CERTIFICATE_VERIFY_FAILED' not in without: raise SystemExit('the certificate set-up does not work as intended')


# ---------- --profile and --perf ----------
def profile(dump, out, a, resize):
    """Sample laion_nb (one process) with py-spy and print the functions that take the most time: the GIL holder's, or with
    --native every thread's (waits included: py-spy cannot tell them apart here)."""
    spy = shutil.which('py-spy') or str(Path(sys.executable).parent/'py-spy')
    cmd = ours(dump, out, a, resize, processes=1)
    raw = out.parent/f'{out.name}.txt'
    subprocess.run([spy, 'record', *(['--gil'] if not a.native else ['--native']), '-r', '200', '-f', 'raw', '-o', str(raw), '--', *cmd],
                   check=True, env=tool_env(a), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def perf(dump, out, a, resize):
    "Sample every CPU of a laion_nb run (both processes, C libraries and kernel included) with Linux perf; print the shares."
    data = out.parent/f'{out.name}.perf.data'
    subprocess.run(['perf', 'record', '-F', '499', '-o', str(data), '--', *ours(dump, out, a, resize)], check=True, env=tool_env(a),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for key, n in (('pid', 4), ('dso', 8), ('pid,dso', 12), ('dso,sym', 25)):
        rep = subprocess.run(['perf', 'report', '-i', str(data), '--no-children', '--sort', key], capture_output=True, text=True).stdout
        print(f'\nCPU samples by {key}:'); print('\n'.join([l for l in rep.splitlines() if l.strip() and not l.startswith('#')][:n]))


def syscalls(dump, out, a, resize):
    "Count the system calls of a laion_nb run (every process and thread) with strace -c; print the table per URL."
    table = out.parent/f'{out.name}.strace.txt'
    subprocess.run(['strace', '-f', '-c', '-o', str(table), '--', *ours(dump, out, a, resize)], check=True, env=tool_env(a),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [l.split() for l in table.read_text().splitlines() if l[:1] == ' ' or l[:1].isdigit()]
    print(f'\nsystem calls per URL ({a.rows:,} rows; strace slows the run, so only the counts mean anything):')
    for r in sorted((r for r in rows if len(r) >= 5 and r[3].isdigit()), key=lambda r: -int(r[3]))[:15]:
        print(f'{int(r[3]) / a.rows:8.2f}  {r[-1]}')


# ---------- the report ----------
def line(r, shape):
    errs = f'  errors: {", ".join(f"{k} {v}" for k, v in r.errors.most_common(6))}' if r.errors else ''
    return (f'{r.name:14s} {shape}: {r.speed:7.1f} URLs/s  {r.cpu:5.2f} ms CPU/URL  peak RSS {r.rss:5.0f} MB  saved {r.saved:,}  '
            f'({r.wall:.1f} s; server {r.server:.2f} ms CPU/URL, {r.server_busy:.0%} of a core, {r.requests:.2f} requests/URL)'
            + ('  SERVER BUSY: try --server-processes 2' if r.server_busy > 0.8 * r.server_procs else '')
            + (f'  MISSES {len(r.misses)}: {"; ".join(r.misses[:3])}' if r.misses else '') + errs)


def report(results, a):
    print('\n| shape | run | tool | URLs/s | CPU ms/URL | peak RSS MB | saved | misses | server CPU ms/URL | requests/URL |'
          '\n|---|---|---|---|---|---|---|---|---|---|')
    for shape, runs in results.items():
        for k, r in runs: print(f'| {shape} | {k} | {r.name} | {r.speed:.1f} | {r.cpu:.2f} | {r.rss:.0f} | {r.saved:,} | {len(r.misses)} | '
                                f'{r.server:.2f} | {r.requests:.2f} |')
    for shape, runs in results.items():
        by = {}
        for k, r in runs: by.setdefault(k, {})[r.name] = r
        pairs = {}
        for k, got in by.items():
            if 'img2dataset' not in got: continue
            theirs = got['img2dataset']
            for name, r in got.items():
                if name != 'img2dataset': pairs.setdefault(name, []).append((r.speed / theirs.speed, theirs.cpu / r.cpu))
        span = lambda xs, f: f'{f.format(min(xs))}-{f.format(max(xs))}' if len(xs) > 1 else f.format(xs[0])
        for name in dict.fromkeys(r.name for _, r in runs):
            rs = [r for _, r in runs if r.name == name]
            print(f'\n{shape}, {name} over {len(rs)} run(s): {span([r.speed for r in rs], "{:.1f}")} URLs/s, '
                  f'{span([r.cpu for r in rs], "{:.2f}")} ms CPU/URL, peak RSS {span([r.rss for r in rs], "{:.0f}")} MB, '
                  f'saved {span([r.saved for r in rs], "{:,}")}, misses {sum(len(r.misses) for r in rs)}; '
                  f'server {span([r.server for r in rs], "{:.2f}")} ms CPU/URL')
        for name, ps in pairs.items():
            print(f'\n{shape}, {name} / img2dataset, per pair: speed {", ".join(f"{s:.2f}x" for s, _ in ps)}; '
                  f'CPU theirs/ours {", ".join(f"{c:.2f}x" for _, c in ps)}')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--shape', choices=('loopback', 'web'), default='loopback', help='one kept-alive host, or the real web\'s shape')
    p.add_argument('--rows', type=int, default=5000)
    p.add_argument('--fail-share', type=float, default=0.1)
    p.add_argument('--hosts', type=int, default=None, help='web: host names (default: rows / 2, as in real LAION rows)')
    p.add_argument('--zipf', type=float, default=1.0, help='web: the k-th host has about A / k**zipf rows')
    p.add_argument('--https-share', type=float, default=0.63, help='web: share of rows on HTTPS')
    p.add_argument('--stalls', action='store_true', help='add a URL that stalls past the timeout to the failure mix')
    p.add_argument('--size', default=None, help='WxH of every good picture, e.g. 1024x768 (default: varied, 160x120 to 480x360)')
    p.add_argument('--latency', type=float, nargs='+', default=None,
                   help='seconds of latency per request, one shape each (default: loopback 0 0.1; web 0.1 1)')
    p.add_argument('--resize', type=int, nargs='+', default=None,
                   help='longest side to resize to, 0 for off, one shape each (default: loopback 0; web 0 384)')
    p.add_argument('--processes', type=int, default=None, help='laion_nb worker processes (default: its own)')
    p.add_argument('--threads', type=int, default=None, help='laion_nb --threads (default: its own)')
    p.add_argument('--per-host', type=int, default=None, help='laion_nb --per-host (default: its own; loopback: no limit)')
    p.add_argument('--peer-processes', type=int, default=2, help='img2dataset --processes_count')
    p.add_argument('--peer-threads', type=int, default=256, help='img2dataset --thread_count (256: its default)')
    p.add_argument('--timeout', type=float, default=10)
    p.add_argument('--retries', type=int, default=3)
    p.add_argument('--peer', default=os.environ.get('IMG2DATASET', str(Path.home()/'i2d-venv/bin/img2dataset')),
                   help='the img2dataset executable, in its own virtualenv')
    p.add_argument('--no-peer', action='store_true')
    p.add_argument('--work-dir', default=None, help='where the dumps and outputs go (default: the system temp dir; /dev/shm takes the disk out)')
    p.add_argument('--tls', action='store_true', help='loopback: serve HTTPS (a certificate from a local CA both tools trust)')
    p.add_argument('--cert-key', choices=('ec', 'rsa'), default='ec', help='the certificate\'s key: P-256 or RSA 2048')
    p.add_argument('--server-processes', type=int, default=1, help='asyncio server processes sharing the ports (SO_REUSEPORT)')
    p.add_argument('--demo-server', action='store_true', help="loopback: the demo's threaded server instead of the asyncio one")
    p.add_argument('--repeat', type=int, default=1, help='runs of each tool per shape, alternating')
    p.add_argument('--code', nargs='+', default=[], metavar='DIR',
                   help='also run laion_nb from these source trees (e.g. a worktree of an older commit), alternating with the rest')
    p.add_argument('--profile', action='store_true', help='profile laion_nb (one process) with py-spy instead')
    p.add_argument('--strace', action='store_true', help='count the system calls of a laion_nb run (strace -c) instead')
    p.add_argument('--perf', action='store_true', help='sample laion_nb with Linux perf (C and kernel time included) instead')
    p.add_argument('--native', action='store_true', help='with --profile: all threads with native frames, not only the GIL holder')
    a = p.parse_args()
    web = a.shape == 'web'
    a.latency = a.latency or ([0.1, 1.0] if web else [0.0, 0.1])
    a.resize = a.resize or ([0, 384] if web else [0])
    if web and a.demo_server: p.error('--demo-server serves one host only (--shape loopback)')
    from laion_nb.demo import BENCH_FAILURES, demo_urls
    failures = BENCH_FAILURES + (['stall/{i}'] if a.stalls else [])
    size = tuple(int(v) for v in a.size.split('x')) if a.size else None
    tmp = Path(tempfile.mkdtemp(prefix='laion_nb_bench_', dir=a.work_dir))
    has_peer = not a.no_peer and Path(a.peer).exists()
    results = {}
    compile_trees(a)
    try:
        tls = web and a.https_share > 0 or a.tls
        a.ca, cert = make_tls(tmp, a.cert_key) if tls else (None, None)
        a.site = make_site(tmp) if web else None
        for latency in a.latency:
            server = (DemoServer(latency, cert and tuple(cert), size) if a.demo_server else
                      BenchServer(latency, cert, size, tuple(WEB_FORMATS) if web else ('jpg', 'png'), a.server_processes))
            with server as s:
                t0 = time.monotonic()
                if web:
                    urls, summary = web_urls(s, a.rows, a.hosts or max(1, a.rows // 2), a.https_share, a.fail_share, failures, zipf=a.zipf)
                else:
                    urls = demo_urls(s, a.rows, a.fail_share, failures=failures, size=size)
                    summary = f'{a.rows:,} rows on one host ({"https" if a.tls else "http"}), {a.fail_share:.0%} failing'
                dump = write_dump(tmp/f'dump-{latency}', urls)
                print(f'latency {latency * 1000:.0f} ms: {summary} (dump written in {time.monotonic() - t0:.1f} s)', flush=True)
                if web and has_peer and cert: check_peer_trust(a, next(u for u in urls if u.startswith('https://') and '/img/' in u))
                for resize in a.resize:
                    shape = f'{a.shape} {latency * 1000:.0f} ms {f"resize {resize}" if resize else "full size"}'
                    tag = f'{latency}-{resize}'
                    if a.profile: profile(dump, tmp/f'prof-{tag}', a, resize); continue
                    if a.perf: perf(dump, tmp/f'perf-{tag}', a, resize); continue
                    if a.strace: syscalls(dump, tmp/f"strace-{tag}", a, resize); continue
                    tools = [('laion_nb', None)] + [(f'laion_nb@{Path(d).name}', d) for d in a.code]
                    tools += [('img2dataset', None)] if has_peer else []
                    for k in range(a.repeat):
                        for name, code in tools:
                            out = tmp/f'out-{name.replace("@", "-")}-{tag}-{k}'
                            r = run_tool(name, dump, out, a, resize, s, code)
                            results.setdefault(shape, []).append((k, r))
                            print(line(r, shape), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if results: report(results, a)


if __name__ == '__main__':
    main()
