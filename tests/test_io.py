"laion_nb.io: host() against the fetcher's own parse, and atomic files under concurrent writers."
import threading

from laion_nb.errors import SampleError
from laion_nb.fetch import split_url
from laion_nb.io import _host_of, atomic_open, host

URLS = ['https://img.example.com/a.jpg', 'HTTP://Img.Example.COM:8080/a.jpg', 'https://user:pw@192.168.0.1:8443/x',
        'https://user@Example.com@evil.com/x', 'http://a.example.com\\@10.0.0.1/x', 'http:/\\10.0.0.1/a', 'http:\\\\10.0.0.1/a',
        'http://[::1]:8080/a', 'http://[::ffff:127.0.0.1]/a', 'http://[fe80::1%25eth0]/a', 'http://[::1', 'http://::1/a',
        'http://LOCALHOST./a', 'http://127.1./a', 'http://2130706433/a', 'http://0x7f.1/a', 'https://Bücher.example/a.jpg',
        'https://例え.jp/猫.jpg', 'https://img.example.com:99999/a.jpg', 'https://img.example.com:/a', 'https://img.example.com:abc/a',
        'https://exa mple.com/a', '  https://img.example.com/padded.jpg  ', 'https://img.example.com?q=1', 'https://img.example.com#f',
        'http://', 'http:///a.jpg', 'http:10.0.0.1/a', '//cdn.example.com/a.jpg', 'cdn.example.com/a.jpg', '/relative/a.jpg', '?q',
        '', 'ftp://Files.Example.com/a', 'file:///etc/passwd', 'javascript:alert(1)', 'https://a.example.com/x\u2028y',
        'https://xn--bcher-kva.example/a', 'https://[2606:2800:220:1:248:1893:25c8:1946]/a', 'https://a.b.c.d.e.example.com./x']


def test_host_is_the_host_the_fetcher_connects_to():
    "For every http(s) URL the fetcher accepts, the same host; '' where it finds none or cannot parse the URL."
    for url in URLS:
        try: want = split_url(url)[1]
        except SampleError as e: want = '' if 'scheme' not in e.message else None
        if want is not None: assert host(url) == want, url


def test_host_needs_only_the_start_of_the_url():
    "Cutting the URL at the end of its authority, then caching, gives what parsing the whole URL gives."
    for url in URLS + [u + '/more/path?and=query#frag' for u in URLS] + [u.replace('/a', '\\a') for u in URLS]:
        assert host(url) == _host_of.__wrapped__(url.strip()), url


def test_concurrent_writers_of_one_file_never_mix(tmp_path):
    "Threads writing the same path each use their own temporary file; the result is one writer's whole content."
    path, errors = tmp_path/'index.jsonl', []
    def write(k):
        try:
            for _ in range(20):
                with atomic_open(path) as f: f.writelines(f'{k} {i}\n' for i in range(2000))
        except Exception as e: errors.append(e)
    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads: t.start()
    for t in threads: t.join(60)
    assert errors == []
    lines = path.read_text(encoding='utf-8').splitlines()
    assert len(lines) == 2000 and len({l.split()[0] for l in lines}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ['index.jsonl']


def test_record_log_lines_are_compact_json_with_line_breaks_escaped(tmp_path):
    "RecordLog writes through `jsonl_line(compact=True)`: the bytes the logs always had (resume peeks at their `{\"index\":`)."
    import json
    from laion_nb.records import FAILED_LOG, SAVED_FILE, Failed, RecordLog, Saved
    cap = 'a "cat" 猫 😀 one\u2028two\u2029three\x85four \\ \t'
    recs = [Saved(3, 'images/3.jpg', 'http://a.example/3.jpg', cap, 64, 80, 1234, 'ab' * 32),
            Saved(4, 'images/4.jpg', 'u', cap, 64, 80, 1234, 'cd' * 32, 640, 800)]
    fails = [Failed(5, 'u5', 'timeout', None, cap, 4), Failed(6, 'u6', 'http_status', 404, 'HTTP 404', 1)]
    with RecordLog(tmp_path) as log:
        for r in recs: log.saved(r)
        for r in fails: log.failed(r)
    def old(r):  # how records wrote a line before io: json.dumps, compact, then the three line breaks escaped by hand
        s = json.dumps(vars(r), ensure_ascii=False, separators=(',', ':'))
        return s.replace('\u2028', '\\u2028').replace('\u2029', '\\u2029').replace('\x85', '\\u0085') + '\n'
    assert (tmp_path/SAVED_FILE).read_bytes() == ''.join(map(old, recs)).encode('utf-8')
    assert (tmp_path/FAILED_LOG).read_bytes() == ''.join(map(old, fails)).encode('utf-8')
    assert (tmp_path/SAVED_FILE).read_bytes().startswith(b'{"index":3,')
