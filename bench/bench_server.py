"""A small asyncio image server for the download benchmark, so the server is not what is measured.

Every body is encoded before the first request and served from memory; each request waits `latency` seconds with
`await asyncio.sleep` (no thread per connection), speaks HTTP/1.1 keep-alive (and closes when the client asks), and
listens on two ports: plain HTTP and, with a certificate, HTTPS (`asyncio.start_server(ssl=...)`). Several server
processes share the two ports with SO_REUSEPORT. Routes (the ones the benchmark's mix needs, as in `laion_nb.demo`):

    /img/{i}.jpg|png|webp|gif   picture i % VARIANTS in that format     /status/{code}   that status (text body)
    /html/{i}                   a 200 HTML page                          /small/{i}.jpg   a 32x32 JPEG
    /truncated/{i}.jpg          a JPEG cut off halfway                   /garbage/{i}.jpg random bytes as image/jpeg
    /loop/{i}                   a 302 to itself                          /reset/{i}       a TCP RST, no answer
    /redirect/{i}               a 302 to /img/{i}.jpg                    /stall/{i}       nothing until the server stops
"""
import asyncio, multiprocessing as mp, os, random, socket, ssl, struct, threading
from pathlib import Path

FORMATS = {'jpg': 'image/jpeg', 'png': 'image/png', 'webp': 'image/webp', 'gif': 'image/gif'}
REASONS = {200: 'OK', 302: 'Found', 403: 'Forbidden', 404: 'Not Found', 410: 'Gone', 429: 'Too Many Requests',
           500: 'Internal Server Error', 503: 'Service Unavailable'}


def bodies(size=None, formats=tuple(FORMATS)):
    "Every body the routes serve, encoded once: {fmt: [bytes per variant]} plus the failure bodies."
    from laion_nb.demo import VARIANTS, demo_image
    # the rarer formats in fewer variants: a GIF's palette takes ~50 ms to make (the server's start-up, not a request's cost)
    out = {fmt: [demo_image(v, fmt, size) for v in range(VARIANTS if fmt in ('jpg', 'png') else 8)] for fmt in formats}
    jpg = out.get('jpg') or [demo_image(v, 'jpg', size) for v in range(VARIANTS)]
    out['small'] = [demo_image(v, 'jpg', (32, 32)) for v in range(VARIANTS)]
    out['truncated'] = [b[:len(b) // 2] for b in jpg]
    out['garbage'] = [random.Random(v).randbytes(5000) for v in range(VARIANTS)]
    return out


def response(code, body=b'', ctype='image/jpeg', extra=b''):
    return (f'HTTP/1.1 {code} {REASONS.get(code, "Status")}\r\nServer: laion_nb-bench\r\nContent-Type: {ctype}\r\n'
            f'Content-Length: {len(body)}\r\n').encode() + extra + b'\r\n' + body


class App:
    "The routes over pre-encoded bodies; `answer(path)` is a response's bytes, or 'reset' / 'stall'."
    def __init__(self, latency, size=None, formats=tuple(FORMATS)):
        self.latency, self.b, self.requests = latency, bodies(size, formats), 0
        self.n = len(self.b['small'])
        self.html = b'<!doctype html><html><body><p>Image removed</p></body></html>'

    def answer(self, target):
        path = target.split(b'?', 1)[0].decode('latin-1')
        if '://' in path: path = '/' + path.split('://', 1)[1].partition('/')[2]
        kind, _, rest = path.strip('/').partition('/')
        name, _, ext = rest.partition('.')
        try: i = int(name)
        except ValueError: return response(404, b'not found', 'text/plain')
        v = i % self.n
        if kind == 'img':
            fmt = {'jpeg': 'jpg'}.get(ext or 'jpg', ext or 'jpg')
            if fmt not in self.b or fmt not in FORMATS: return response(404, b'no such format', 'text/plain')
            return response(200, self.b[fmt][i % len(self.b[fmt])], FORMATS[fmt])
        if kind == 'status': return response(i, f'HTTP {i}'.encode(), 'text/plain', b'Retry-After: 1\r\n' if i in (429, 503) else b'')
        if kind == 'html': return response(200, self.html, 'text/html')
        if kind in ('small', 'truncated', 'garbage'): return response(200, self.b[kind][v])
        if kind == 'loop': return response(302, b'', 'text/plain', f'Location: /loop/{i}\r\n'.encode())
        if kind == 'redirect': return response(302, b'', 'text/plain', f'Location: /img/{i}.jpg\r\n'.encode())
        if kind in ('reset', 'stall'): return kind
        return response(404, b'no such route', 'text/plain')

    async def handle(self, reader, writer):
        try:
            while True:
                try: head = await reader.readuntil(b'\r\n\r\n')
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ssl.SSLError, OSError): return
                line = head.split(b'\r\n', 1)[0].split(b' ')
                if len(line) != 3: return
                close = line[2] == b'HTTP/1.0' or b'connection: close' in head.lower()
                self.requests += 1
                if self.latency: await asyncio.sleep(self.latency)
                out = self.answer(line[1])
                if out == 'reset':
                    sock = writer.get_extra_info('socket')
                    if sock is not None: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
                    writer.transport.abort(); return
                if out == 'stall': await asyncio.sleep(3600); return
                writer.write(out)
                await writer.drain()
                if close: return
        except (ConnectionError, ssl.SSLError, OSError): pass
        finally:
            try: writer.close()
            except Exception: pass


def listener(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(('127.0.0.1', port))
    return s


def serve(latency, size, formats, cert, ports, conn):
    "A server process: listen on `ports` (0: any free port), send the ports, serve until told 'stop'; 'stats' asks for requests."
    app = App(latency, size, formats)
    ctx = None
    if cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(*cert)
    async def main():
        loop, stop = asyncio.get_running_loop(), asyncio.Event()
        socks = [listener(ports[0])] + ([listener(ports[1])] if ctx else [])
        servers = [await asyncio.start_server(app.handle, sock=socks[0], backlog=4096, limit=2**16)]
        if ctx: servers.append(await asyncio.start_server(app.handle, sock=socks[1], backlog=4096, ssl=ctx, limit=2**16))
        conn.send(tuple(s.getsockname()[1] for s in socks))
        def listen():
            while True:
                try: msg = conn.recv()
                except EOFError: msg = 'stop'
                if msg == 'stats': conn.send(app.requests); continue
                loop.call_soon_threadsafe(stop.set); return
        threading.Thread(target=listen, daemon=True).start()
        await stop.wait()
        for s in servers: s.close()
    asyncio.run(main())


def cpu_seconds(pid):
    "User + system CPU seconds of process `pid` so far."
    f = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf('SC_CLK_TCK')


class BenchServer:
    """`processes` server processes (spawned) sharing an HTTP port and, with `cert` ((cert, key) paths), an HTTPS port.

    `url(route, host=None, https=None)` makes a URL; `cpu()` is the servers' CPU seconds so far, `requests()` their request count."""
    def __init__(self, latency, cert=None, size=None, formats=tuple(FORMATS), processes=1):
        self.args, self.n, self.cert = (latency, size, formats, cert), processes, cert
        self.procs, self.pipes = [], []

    def _start(self, ports):
        parent, child = mp.Pipe()
        p = mp.get_context('spawn').Process(target=serve, args=(*self.args, ports, child), daemon=True)
        p.start(); self.procs.append(p); self.pipes.append(parent)
        return parent.recv()

    def __enter__(self):
        self.ports = self._start((0, 0))
        for _ in range(self.n - 1): self._start(self.ports)
        self.http_port, self.https_port = self.ports[0], (self.ports[1] if self.cert else None)
        return self

    def url(self, route, host='127.0.0.1', https=None):
        "The URL of `route` on `host`; https when asked (default: when the server has a certificate)."
        https = bool(self.cert) if https is None else https
        return f'{"https" if https else "http"}://{host}:{self.https_port if https else self.http_port}/{route.lstrip("/")}'

    def cpu(self): return sum(cpu_seconds(p.pid) for p in self.procs)

    def requests(self):
        for c in self.pipes: c.send('stats')
        return sum(c.recv() for c in self.pipes)

    def __exit__(self, *exc):
        for c in self.pipes:
            try: c.send('stop')
            except OSError: pass
        for p in self.procs:
            p.join(10)
            if p.is_alive(): p.kill()
