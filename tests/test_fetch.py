"Fetch against hostile servers on 127.0.0.1: every phase bounded by the deadline, the cap on raw and decoded bytes, messages in the user's terms."
import gzip
import os
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from laion_nb import demo
from laion_nb.errors import SampleError
from laion_nb.fetch import FetchConfig, Fetcher

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
    before = threading.active_count()
    s = demo.ImageServer().start()
    clients = []
    for route in HANGING + FLOODS:
        c = socket.create_connection(('127.0.0.1', s.port)); c.sendall(f'GET /{route} HTTP/1.1\r\nHost: x\r\n\r\n'.encode())
        clients.append(c)
    clients.append(socket.create_connection(('127.0.0.1', int(s.slow_tls_url.split(':')[2].split('/')[0]))))
    time.sleep(0.5)
    assert threading.active_count() >= before + len(clients)
    s.stop()
    t = time.monotonic()
    while threading.active_count() > before and time.monotonic() < t + 8: time.sleep(0.05)
    print(f'threads ended {time.monotonic() - t:.2f} s after stop')
    left = [t.name for t in threading.enumerate()][before:]
    for c in clients: c.close()
    assert threading.active_count() <= before, left
