"""Benchmark: the fetch layer alone, the asyncio `Fetcher.aget` against the urllib3-in-threads `Fetcher.get` of git `main`.

One process fetches N URLs of the demo image server (`img/{i}.jpg`, served by a process of its own with injected
latency, as bench_download.py's `Server` does), with the same number of requests in flight: the old path in a
ThreadPoolExecutor of T threads, the new one as T coroutines on one event loop. Each run is a fresh subprocess; it
prints URLs/s and CPU ms per URL (`time.process_time()`: every thread of the process, the server not included).

    python bench/bench_fetch.py                                   # 0.1 s and 1 s latency, HTTP and HTTPS, 256 in flight
    python bench/bench_fetch.py --urls 2000 --inflight 512 --latency 1
    python bench/bench_fetch.py --hosts 500                       # 500 host names (*.bench.test): a new connection per host
    python bench/bench_fetch.py --no-keep --tls-only              # a new TLS connection per URL: what session resumption saves

Read the many-host HTTPS shape with care: the event loop does every TLS handshake of the process on one thread,
where the old threads spread them over both cores (OpenSSL releases the GIL), and on a machine loaded by others a
single busy thread gets a smaller share of the CPU than 512 threads do. Run it on a quiet machine.
"""
import argparse, asyncio, importlib.util, json, os, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_download import Server  # the demo server in a process of its own


def make_cert(folder):
    "A self-signed certificate for 127.0.0.1 and *.bench.test, made with openssl."
    cert, key = str(folder/'cert.pem'), str(folder/'key.pem')
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-keyout', key, '-out', cert,
                    '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:*.bench.test'], check=True, capture_output=True)
    return cert, key


def old_fetch_module(path):
    "git main's laion_nb/fetch.py, loaded as laion_nb._old_fetch (its relative imports resolve in this laion_nb)."
    spec = importlib.util.spec_from_file_location('laion_nb._old_fetch', path)
    mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
    return mod


def urls_for(port, scheme, n, hosts):
    if hosts <= 1: return [f'{scheme}://127.0.0.1:{port}/img/{i}.jpg' for i in range(n)]
    return [f'{scheme}://h{i % hosts}.bench.test:{port}/img/{i}.jpg' for i in range(n)]


def child(a):
    "One measured run in this process: prints a JSON line."
    names = {f'h{k}.bench.test' for k in range(a.hosts)} if a.hosts > 1 else set()
    urls = urls_for(a.port, a.scheme, a.urls, a.hosts)
    if a.which == 'old':
        from concurrent.futures import ThreadPoolExecutor
        F = old_fetch_module(a.old)
        for h in names: F._dns_cache[h] = (['127.0.0.1'], time.monotonic() + 3600)
        f = F.Fetcher(F.FetchConfig(timeout=30, retries=0, allow_private_networks=True))
        def one(u):
            try: return len(f.get(u).content) > 0
            except F.SampleError: return False
        t, c = time.monotonic(), time.process_time()
        with ThreadPoolExecutor(a.inflight) as pool: ok = sum(pool.map(one, urls))
    else:
        from laion_nb.fetch import Fetcher, FetchConfig, Resolver
        from laion_nb.errors import SampleError
        cfg = FetchConfig(timeout=30, retries=0, allow_private_networks=True, **({'kept_connections': 0} if a.no_keep else {}))
        f = Fetcher(cfg, Resolver(hosts={'*.bench.test': '127.0.0.1'}))
        if a.which == 'new-nosessions':
            class NoStore(dict):
                def __setitem__(self, k, v): pass
            f.tls_sessions = NoStore()
        async def main():
            todo = iter(urls)
            async def worker():
                n = 0
                for u in todo:
                    try: n += len((await f.aget(u)).content) > 0
                    except SampleError: pass
                return n
            return sum(await asyncio.gather(*(worker() for _ in range(a.inflight))))
        t, c = time.monotonic(), time.process_time()
        ok = asyncio.run(main())
    wall, cpu = time.monotonic() - t, time.process_time() - c
    print(json.dumps({'ok': ok, 'wall': wall, 'cpu': cpu}))


def measure(a, which, port, scheme, env):
    cmd = [sys.executable, __file__, '--child', which, '--port', str(port), '--scheme', scheme, '--urls', str(a.urls),
           '--inflight', str(a.inflight), '--hosts', str(a.hosts), '--old', a.old] + (['--no-keep'] if a.no_keep else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode: raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--urls', type=int, default=2000)
    p.add_argument('--inflight', type=int, default=256, help='threads (old) or coroutines (new) in one process')
    p.add_argument('--latency', type=float, nargs='+', default=[0.1, 1.0])
    p.add_argument('--hosts', type=int, default=1, help='host names the URLs spread over (*.bench.test, all resolving to 127.0.0.1)')
    p.add_argument('--tls-only', action='store_true'); p.add_argument('--http-only', action='store_true')
    p.add_argument('--no-keep', action='store_true', help='new: keep no connections (every URL a new connection), with and without TLS sessions')
    p.add_argument('--repeat', type=int, default=1)
    p.add_argument('--old', default=None, help="the old fetch.py (default: git show main:laion_nb/fetch.py)")
    p.add_argument('--child', default=None); p.add_argument('--port', type=int); p.add_argument('--scheme')
    a = p.parse_args()
    if a.child: a.which = a.child; return child(a)
    tmp = Path(tempfile.mkdtemp(prefix='bench_fetch_'))
    if a.old is None:
        a.old = str(tmp/'oldfetch.py')
        Path(a.old).write_text(subprocess.run(['git', 'show', 'main:laion_nb/fetch.py'], cwd=HERE.parent, capture_output=True,
                                              text=True, check=True).stdout)
    cert = make_cert(tmp)
    schemes = ['https'] if a.tls_only else ['http'] if a.http_only else ['http', 'https']
    whos = ['new', 'new-nosessions'] if a.no_keep else ['old', 'new']
    print(f'{a.urls} URLs, {a.inflight} in flight, {a.hosts} host(s){", no kept connections" if a.no_keep else ""}; CPU of the client process only')
    print(f'{"latency":>7} {"scheme":6} {"fetcher":15} {"URLs/s":>8} {"CPU ms/URL":>10} {"ok":>6}')
    for latency in a.latency:
        for scheme in schemes:
            env = {**os.environ, 'REQUESTS_CA_BUNDLE': cert[0], 'SSL_CERT_FILE': cert[0]}
            with Server(latency, cert if scheme == 'https' else None) as server:
                port = int(server.url('x').split(':')[2].split('/')[0])
                for _ in range(a.repeat):
                    for which in whos:
                        r = measure(a, which, port, scheme, env)
                        print(f'{latency:7g} {scheme:6} {which:15} {r["ok"] / r["wall"]:8.0f} {1000 * r["cpu"] / a.urls:10.2f} {r["ok"]:6}', flush=True)


if __name__ == '__main__':
    main()
