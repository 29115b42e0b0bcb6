"Fetch against hostile servers on 127.0.0.1: every phase bounded by the deadline, the cap on raw and decoded bytes, messages in the user's terms."
import asyncio
import base64
import gzip
import json
import os
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from laion_nb import demo
from laion_nb.errors import SampleError
from laion_nb.fetch import FetchConfig, Fetcher, Resolver

TIMEOUT, MARGIN = 1.0, 1.5   # every hostile URL must end within TIMEOUT + MARGIN
HANGING = ['stall/1', 'drip/1', 'slowstatus/1', 'slowheader/1', 'slowchunk/1.jpg']   # end only at the deadline
FLOODS = ['endless/1.jpg', 'emptygzip/1.jpg', 'emptydeflate/1.jpg']                   # end at the cap or the deadline


@pytest.fixture(scope='module')
def server():
    with demo.ImageServer() as s: yield s


@pytest.fixture(scope='module')
def cert(tmp_path_factory):
    "A self-signed certificate for 127.0.0.1, as openssl makes it."
    d = tmp_path_factory.mktemp('tls')
    crt, key = str(d/'cert.pem'), str(d/'key.pem')
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-keyout', key, '-out', crt,
                    '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1'], check=True, capture_output=True)
    return crt, key


@pytest.fixture(scope='module')
def tls_server(cert):
    with demo.ImageServer(tls=cert) as s: yield s


def fetcher(ca=None, **kw):
    "A fetcher with the tests' short deadline and no retries; it trusts the certificate `ca` if given."
    cfg = FetchConfig(**{'timeout': TIMEOUT, 'retries': 0, 'allow_private_networks': True, 'max_bytes': 2**20, **kw})
    saved = {k: os.environ.pop(k) for k in ('REQUESTS_CA_BUNDLE', 'CURL_CA_BUNDLE') if k in os.environ}
    try:
        if ca: os.environ['REQUESTS_CA_BUNDLE'] = ca
        return Fetcher(cfg)
    finally:
        os.environ.pop('REQUESTS_CA_BUNDLE', None); os.environ.update(saved)


def timed(f, url, limit=TIMEOUT + 10):
    "(error type or 'ok', message, seconds) of `f.get(url)`; a fetch still running after `limit` s fails the test, not hangs it."
    box = {}
    def run():
        t = time.monotonic()
        try: f.get(url); box['got'] = ('ok', '')
        except SampleError as e: box['got'] = (e.error_type, e.message)
        box['took'] = time.monotonic() - t
    th = threading.Thread(target=run, daemon=True); th.start(); th.join(limit)
    assert not th.is_alive(), f'{url} still running after {limit} s'
    return box['got'] + (box['took'],)


@pytest.mark.parametrize('route', HANGING)
def test_hanging_routes_end_at_the_deadline_over_http(server, route):
    kind, msg, took = timed(fetcher(), server.url(route))
    assert kind == 'timeout' and took < TIMEOUT + MARGIN, (kind, msg, took)
    assert f'after 1 s at 127.0.0.1:{server.port}' in msg


@pytest.mark.parametrize('route', HANGING)
def test_hanging_routes_end_at_the_deadline_over_https(tls_server, cert, route):
    kind, msg, took = timed(fetcher(cert[0]), tls_server.url(route))
    assert kind == 'timeout' and took < TIMEOUT + MARGIN, (kind, msg, took)


def test_a_dripping_tls_handshake_ends_at_the_deadline(server):
    kind, msg, took = timed(fetcher(), server.slow_tls_url)
    assert kind == 'timeout' and took < TIMEOUT + MARGIN and 'TLS handshake' in msg, (kind, msg, took)


def test_a_connection_never_accepted_ends_at_the_deadline():
    "The connect phase: a listener whose queue is full drops the SYN, so connect() waits; the deadline ends it."
    with socket.socket() as srv:
        srv.bind(('127.0.0.1', 0)); srv.listen(0)
        fill = [socket.socket() for _ in range(4)]
        for c in fill: c.setblocking(False); c.connect_ex(srv.getsockname())
        time.sleep(0.2)
        kind, msg, took = timed(fetcher(), f'http://127.0.0.1:{srv.getsockname()[1]}/a.jpg')
        for c in fill: c.close()
    assert kind == 'timeout' and took < TIMEOUT + MARGIN and 'while connecting' in msg, (kind, msg, took)


@pytest.mark.parametrize('tls', [False, True])
@pytest.mark.parametrize('route', FLOODS)
def test_endless_bodies_end_at_the_cap_or_the_deadline(server, tls_server, cert, route, tls):
    "With a 1 MiB cap on loopback the cap comes first (`too_many_bytes`); from a slow server it would be the deadline."
    f, s = (fetcher(cert[0]), tls_server) if tls else (fetcher(), server)
    kind, msg, took = timed(f, s.url(route))
    assert kind in ('too_many_bytes', 'timeout') and took < TIMEOUT + MARGIN, (kind, msg, took)


@pytest.mark.parametrize('route', ['emptygzip/1.jpg', 'emptydeflate/1.jpg'])
def test_the_cap_counts_bytes_read_not_only_bytes_decoded(server, route):
    "Empty deflate blocks decode to nothing: only a cap on raw bytes stops them before the deadline."
    kind, msg, took = timed(fetcher(timeout=2, max_bytes=2**18), server.url(route))
    assert kind == 'too_many_bytes' and took < 2, (kind, msg, took)


def test_a_gzip_bomb_stops_at_the_cap_and_gzip_members_join(server):
    "A small gzip body that decodes past the cap is refused; two gzip members decode to both."
    body = gzip.compress(b'\0' * 10**7)  # 10 KB that decode to 10 MB
    two = gzip.compress(demo.demo_image(1)) + gzip.compress(b'tail')
    with socket.create_server(('127.0.0.1', 0)) as srv:
        def serve():
            for payload in (body, two):
                conn, _ = srv.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\nConnection: close\r\n\r\n'
                                 % len(payload) + payload)
        th = threading.Thread(target=serve, daemon=True); th.start()
        url = f'http://127.0.0.1:{srv.getsockname()[1]}/a.jpg'
        kind, msg, _ = timed(fetcher(), url)
        assert kind == 'too_many_bytes', msg
        assert fetcher().get(url).content == demo.demo_image(1) + b'tail'
        th.join(5)


def test_many_threads_of_hostile_urls_all_end_within_the_deadline(server):
    "16 threads, 32 hostile URLs, one fetcher: every URL ends within its deadline plus the margin."
    routes = (HANGING + FLOODS) * 4
    urls = [server.url(r.replace('/1', f'/{k}')) for k, r in enumerate(routes)][:28] + [server.slow_tls_url] * 4
    f = fetcher()
    t = time.monotonic()
    with ThreadPoolExecutor(16) as pool: res = list(pool.map(lambda u: timed(f, u), urls))
    wall = time.monotonic() - t
    assert len(res) == 32 and {k for k, _, _ in res} <= {'timeout', 'too_many_bytes'}, res
    assert max(took for _, _, took in res) < TIMEOUT + MARGIN, sorted(took for _, _, took in res)
    assert wall < 2 * TIMEOUT + 2 * MARGIN, wall   # two rounds of 16


def test_a_url_with_spaces_around_it_is_fetched_as_checked(server):
    assert fetcher().get(f'  {server.url("img/4.jpg")}\n').content == demo.demo_image(4)


@pytest.mark.parametrize('kw, want', [(dict(timeout=float('inf')), 'timeout must be > 0 and <= 3600 seconds, got inf'),
                                      (dict(timeout=float('nan')), 'got nan'), (dict(timeout=1e9), 'got 1000000000.0'),
                                      (dict(timeout=0), 'timeout must be > 0'), (dict(retries=10**6), 'retries must be a whole number >= 0 and <= 100')])
def test_absurd_numbers_are_refused_with_the_range(kw, want):
    with pytest.raises(ValueError, match=want.replace('.', r'\.')): FetchConfig(**kw)


def test_messages_say_what_happened_not_which_class(server, tls_server):
    f = fetcher()
    port = server.port
    cases = {server.refused_url: ('connect', 'connection refused by 127.0.0.1:'),
             server.url('stall/1'): ('timeout', f'timed out after 1 s at 127.0.0.1:{port} while waiting for the status line'),
             server.url('drip/1'): ('timeout', f'timed out after 1 s at 127.0.0.1:{port} while reading the body'),
             server.url('reset/1'): ('reset', f'connection reset by 127.0.0.1:{port}'),
             tls_server.url('img/1.jpg'): ('connect', f'TLS handshake with 127.0.0.1:{tls_server.port} failed: '
                                                      '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed')}
    with ThreadPoolExecutor(len(cases)) as pool: got = dict(zip(cases, pool.map(lambda u: timed(f, u), cases)))
    for url, (kind, start) in cases.items():
        assert got[url][0] == kind and got[url][1].startswith(start), (url, got[url])
        assert not any(w in got[url][1] for w in ('Pool', 'Connection(', 'object at', '_ssl.c')), got[url]


def test_attempts_leave_no_socket_open(server):
    "Hundreds of attempts, failed ones included, leave no socket open once the fetcher is closed. (Was: the reaper's heap.)"
    f = fetcher()
    fds = len(os.listdir('/proc/self/fd'))
    for i in range(300): f.get(server.url(f'img/{i}.jpg'))
    for r in ('status/404', 'reset/1', 'huge/1.jpg', 'stall/1'):
        with pytest.raises(SampleError): f.get(server.url(r))
    f.close()
    assert len(os.listdir('/proc/self/fd')) <= fds + 2


def test_hanging_false_leaves_out_what_ends_only_at_a_deadline(server, tmp_path):
    urls = demo.demo_urls(server, hanging=False)
    assert len(urls) == len(demo.demo_urls(server)) - 2 and not any(k in u for u in urls for k in ('/stall/', '/drip/'))
    mixed = demo.demo_urls(server, n=200, fail_share=0.5, failures=demo.HOSTILE + ['status/404'], hanging=False)
    assert not [u for u in mixed if u.split('/')[3] in demo.HANGING]
    assert len(demo.demo_urls(server, hostile=True)) == len(demo.demo_urls(server)) + len(demo.HOSTILE) + len(demo.ODD_IMAGES) + 1


def test_hanging_routes_end_when_the_server_stops():
    "Clients that never read: every hostile route's thread still ends soon after the server stops."
    before = set(threading.enumerate())  # other tests' threads may come and go: count only the ones this server starts
    s = demo.ImageServer().start()
    clients = []
    for route in HANGING + FLOODS:
        c = socket.create_connection(('127.0.0.1', s.port)); c.sendall(f'GET /{route} HTTP/1.1\r\nHost: x\r\n\r\n'.encode())
        clients.append(c)
    clients.append(socket.create_connection(('127.0.0.1', int(s.slow_tls_url.split(':')[2].split('/')[0]))))
    new = lambda: [t for t in threading.enumerate() if t not in before and t.is_alive()]
    t = time.monotonic()
    while len(new()) < len(clients) and time.monotonic() < t + 5: time.sleep(0.05)
    assert len(new()) >= len(clients), f'{len(new())} server threads for {len(clients)} clients'
    s.stop()
    t = time.monotonic()
    while new() and time.monotonic() < t + 8: time.sleep(0.05)
    print(f'threads ended {time.monotonic() - t:.2f} s after stop')
    left = [t.name for t in new()]
    for c in clients: c.close()
    assert not left, left


# ---------------------------------------------------------------- the event loop: many in flight, kept connections, limits

def run(coro):
    "Run `coro` on a new event loop (each test its own), with a limit so a hang fails the test."
    return asyncio.run(asyncio.wait_for(coro, 60))


class RawServer:
    "A raw-socket HTTP server on 127.0.0.1: `answer(conn, n)` answers the n-th request of a connection; counts accepted connections."
    def __init__(self, answer):
        self.answer, self.accepted, self.srv = answer, 0, socket.create_server(('127.0.0.1', 0))
        self.port = self.srv.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try: conn, _ = self.srv.accept()
            except OSError: return
            self.accepted += 1
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn):
        with conn:
            buf, n = b'', 0
            while True:
                while b'\r\n\r\n' not in buf:
                    try: data = conn.recv(65536)
                    except OSError: return
                    if not data: return
                    buf += data
                _, buf = buf.split(b'\r\n\r\n', 1)
                n += 1
                if self.answer(conn, n) is False: return

    def url(self, path='a.jpg'): return f'http://127.0.0.1:{self.port}/{path}'
    def __enter__(self): return self
    def __exit__(self, *exc): self.srv.close()


def ok(conn, n, body=b'picture'):
    conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s' % (len(body), body))


def test_a_kept_connection_is_shared_by_the_coroutines_of_a_loop():
    "Ten requests one after another, each in its own task, go on one connection; ten at once open at most ten, and ten more none."
    async def go(url):
        f = fetcher()
        for _ in range(10): assert (await asyncio.create_task(f.aget(url))).content == b'picture'
        first = srv.accepted
        await asyncio.gather(*(f.aget(url) for _ in range(10)))
        second = srv.accepted
        await asyncio.gather(*(f.aget(url) for _ in range(10)))
        await f.aclose()
        return first, second, srv.accepted
    with RawServer(ok) as srv: first, second, third = run(go(srv.url()))
    assert first == 1 and second <= 10 and third == second, (first, second, third)


def test_a_kept_connection_the_server_dropped_is_retried_once_on_a_new_one():
    "A server that answers one request per connection, then hangs up on the next: the request goes again, not counted as an attempt."
    def once(conn, n):
        if n > 1: return False   # closes without a byte of answer
        ok(conn, n)
    async def go(url):
        f = fetcher()
        got = [await f.aget(url) for _ in range(3)]
        await f.aclose()
        return got
    with RawServer(once) as srv:
        got = run(go(srv.url()))
        assert [(r.content, r.attempts) for r in got] == [(b'picture', 1)] * 3 and srv.accepted == 3, srv.accepted


def test_five_hundred_requests_at_once_on_a_stalling_route_end_at_the_deadline():
    "500 coroutines on one loop against a server that never answers: all are timeouts, all within the deadline plus a margin."
    async def go(s):
        f = fetcher()
        async def one(k):
            t = time.monotonic()
            try: await f.aget(s.url(f'stall/{k}')); return 'ok', time.monotonic() - t
            except SampleError as e: return e.error_type, time.monotonic() - t
        t = time.monotonic()
        res = await asyncio.gather(*(one(k) for k in range(500)))
        return res, time.monotonic() - t
    with demo.ImageServer() as s: res, wall = run(go(s))
    assert {k for k, _ in res} == {'timeout'}, res[:5]
    assert max(took for _, took in res) < TIMEOUT + 3 and wall < TIMEOUT + 3, (max(took for _, took in res), wall)


@pytest.mark.parametrize('head, want', [
    (b'HTTP/1.1 200 OK\r\nX-Long: ' + b'a' * 70_000 + b'\r\n\r\n', 'a line longer than 65536 bytes'),
    (b'HTTP/1.1 200 OK\r\n' + b''.join(b'X-%d: 1\r\n' % k for k in range(101)) + b'\r\n', 'more than 100 headers'),
    (b'HTTP/1.1 200 OK\r\n' + b'X' * 70_000, 'a line longer than 65536 bytes'),
    (b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n' + b'0' * 70_000 + b'\r\n', 'a line longer than 65536 bytes'),
    (b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef', 'a bad Content-Length'),
    (b'I am not HTTP\r\n\r\n', 'a bad status line')])
def test_a_head_past_the_parser_limits_is_a_broken_response(head, want):
    "A header or chunk-size line over 64 KiB, more than 100 headers, or a bad length: `reset`, at once, with what broke."
    def send(conn, n): conn.sendall(head); time.sleep(0.5); return False
    with RawServer(send) as srv:
        kind, msg, took = timed(fetcher(), srv.url())
    assert kind == 'reset' and f'127.0.0.1:{srv.port} sent a broken response: {want}' in msg and took < TIMEOUT, (kind, msg, took)


def test_the_resolver_gives_made_up_hosts_their_address(server):
    "A `hosts` wildcard sends every subdomain to the given address; the Host header keeps the name."
    f = Fetcher(FetchConfig(timeout=TIMEOUT, retries=0, allow_private_networks=True), Resolver(hosts={'*.bench.test': '127.0.0.1'}))
    sent = json.loads(f.get(f'http://img7.cdn.bench.test:{server.port}/echo/1').content)
    assert sent['headers']['Host'] == f'img7.cdn.bench.test:{server.port}'
    with pytest.raises(SampleError, match='non-public address 127.0.0.1'):
        Fetcher(FetchConfig(timeout=TIMEOUT, retries=0), Resolver(hosts={'*.bench.test': '127.0.0.1'})).get(f'http://a.bench.test:{server.port}/img/1.jpg')


def test_tls_sessions_are_resumed_on_new_connections(tls_server, cert):
    "With no kept connections, each request makes a new TLS connection; the second notes the host's session, later ones resume it."
    f = fetcher(cert[0], kept_connections=0)
    for i in range(5): assert f.get(tls_server.url(f'img/{i}.jpg')).content == demo.demo_image(i)
    assert f.tls_resumed == 3, f.tls_resumed  # the first connection reads no session: most hosts are met once


def test_https_through_a_tunnelling_proxy(tls_server, cert):
    "HTTPS_PROXY: a CONNECT to the proxy with its credentials, then TLS end to end with the server's certificate checked."
    seen = []
    with socket.create_server(('127.0.0.1', 0)) as proxy:
        def serve():
            conn, _ = proxy.accept()
            head = b''
            while b'\r\n\r\n' not in head: head += conn.recv(4096)
            seen.append(head.decode())
            up = socket.create_connection(('127.0.0.1', tls_server.port))
            conn.sendall(b'HTTP/1.1 200 Connection established\r\n\r\n')
            def pipe(a, b):
                try:
                    while data := a.recv(65536): b.sendall(data)
                except OSError: pass
                finally:
                    for s in (a, b):
                        try: s.shutdown(socket.SHUT_RDWR)
                        except OSError: pass
            threading.Thread(target=pipe, args=(up, conn), daemon=True).start()
            pipe(conn, up)
        threading.Thread(target=serve, daemon=True).start()
        saved = {k: os.environ.pop(k) for k in list(os.environ) if k.lower().endswith('_proxy')}
        os.environ['HTTPS_PROXY'] = f'http://user:secret@127.0.0.1:{proxy.getsockname()[1]}'
        try: f = fetcher(cert[0])
        finally: os.environ.pop('HTTPS_PROXY'); os.environ.update(saved)
        assert f.get(tls_server.url('img/6.jpg')).content == demo.demo_image(6)
        f.close()
    assert seen[0].startswith(f'CONNECT 127.0.0.1:{tls_server.port} HTTP/1.1\r\n'), seen
    assert 'Proxy-Authorization: Basic ' + base64.b64encode(b'user:secret').decode() in seen[0], seen


def test_get_works_inside_a_running_event_loop(server):
    "As in a Jupyter cell, where the kernel's loop runs: `get` hands the request to the fetcher's side thread."
    f = fetcher()
    async def cell(): return f.get(server.url('img/9.jpg')).content
    assert asyncio.run(cell()) == demo.demo_image(9)
    f.close()
