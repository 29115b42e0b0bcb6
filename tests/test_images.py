"Image checks on real images made with PIL and numpy: bounded memory, faithful pixels, EXIF orientation, lying and padded JPEGs, no bomb warning."
import io
import json
import os
import resource
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from laion_nb import images
from laion_nb.errors import SampleError
from laion_nb.images import ImageRules, check_image


def enc(im, fmt='JPEG', **kw):
    buf = io.BytesIO(); im.save(buf, fmt, **kw); return buf.getvalue()


def decoded(c):
    im = Image.open(io.BytesIO(c.data)); im.load(); return im


def error_type(data, rules=None):
    with pytest.raises(SampleError) as e: check_image(data, rules)
    return e.value.error_type


def photo(w=1024, h=768, seed=0):
    "A photo-like RGB image: smooth shapes and a little noise."
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([128 + 100*np.sin(x/50), 128 + 100*np.cos(y/40), (x + y)/8 % 256], -1)
    a += np.random.default_rng(seed).normal(0, 6, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def png(w, h, depth, ctype, row):
    "A PNG written by hand: `row` (filter byte excluded) repeated `h` times."
    def chunk(kind, data): return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, depth, ctype, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress((b'\0' + row) * h, 9)) + chunk(b'IEND', b''))


# ---- 1. bounded memory -------------------------------------------------------------------------

CHILD = r'''
import json, resource, struct, sys, zlib
from concurrent.futures import ThreadPoolExecutor
from laion_nb.images import check_image
def png1(w, h):  # 1 bit per pixel, a few KB that decode to w x h bytes (and more once converted)
    def chunk(k, d): return struct.pack('>I', len(d)) + k + d + struct.pack('>I', zlib.crc32(k + d))
    row = b'\0' + b'\x55' * ((w + 7) // 8)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 1, 0, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(row * h, 9)) + chunk(b'IEND', b''))
bodies = [png1(7000, 7000)] * 30 + [png1(10000, 10000)] * 2
bodies.insert(20, bodies.pop())
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = rss()
with ThreadPoolExecutor(32) as ex: sizes = list(ex.map(lambda b: check_image(b).width, bodies))
vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmPeak'))
print(json.dumps({'base': base, 'peak': rss(), 'vm': vm, 'sizes': sizes, 'bytes': len(bodies[0])}))
'''


def test_pixel_budget_bounds_peak_rss(tmp_path):
    "32 PNGs of 12-25 KB that decode to 49M and 100M pixels, on 32 threads: the process stays under 1.5 GB (without the budget it passed 8 GB)."
    def cap():  # at most 6 GB of address space, so that a regression fails with a MemoryError instead of eating the machine
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30 if hard == resource.RLIM_INFINITY else min(6 * 2**30, hard), hard))
    out = subprocess.run([sys.executable, '-c', CHILD], capture_output=True, text=True, timeout=300, cwd=tmp_path, preexec_fn=cap)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert sorted(r['sizes']) == [7000] * 30 + [10000] * 2
    assert r['bytes'] < 20_000
    grew = r['peak'] - r['base']
    print(f"peak RSS {r['peak'] / 2**20:.0f} MiB, {grew / 2**20:.0f} MiB over the start, address space {r['vm'] / 2**20:.0f} MiB")
    assert r['peak'] < 1.5e9
    assert grew < images.PIXEL_BUDGET.limit + 200 * 2**20


def test_budget_waits_and_runs_big_alone():
    "Checks in flight never hold more than the limit, except one image larger than the limit, which runs alone."
    b, lock, inside, seen = images.PixelBudget(100), threading.Lock(), [], []
    def one(cost):
        with b(cost):
            with lock: inside.append(cost); seen.append((sum(inside), len(inside), max(inside)))
            time.sleep(0.01)
            with lock: inside.remove(cost)
    ts = [threading.Thread(target=one, args=(c,)) for c in [30, 30, 30, 250, 30, 60, 90, 10] * 4]
    for t in ts: t.start()
    for t in ts: t.join(10)
    assert len(seen) == 32 and b.used == 0
    assert all(total <= 100 or n == 1 for total, n, _ in seen), seen
    assert max(n for _, n, _ in seen) >= 3  # small ones do run together
    assert b.peak == 250


def test_budget_survives_an_interrupted_waiter():
    "A waiter interrupted by Ctrl-C leaves the queue: the ones behind it still run; a failing check gives its bytes back."
    import signal
    b, release = images.PixelBudget(100), threading.Event()
    def holder():
        with b(100): release.wait(5)
    t = threading.Thread(target=holder); t.start(); time.sleep(0.05)
    threading.Timer(0.1, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        with b(50): pass
    assert t.is_alive() and not b._queue  # interrupted while it waited, and gone from the queue
    release.set(); t.join(5)
    with pytest.raises(ValueError):
        with b(60): raise ValueError('a check that fails')
    assert b.used == 0 and not b._queue


# ---- 2. faithful pixels ------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['png16 grey', 'png16 rgb', 'tiff16 grey', 'tiff16 big-endian', 'tiff32 int'])
def test_high_bit_depth_keeps_its_brightness(kind):
    "16-bit values are divided by 257: a mid grey stays mid grey (it came out almost white)."
    g = np.linspace(0, 65535, 200 * 150).reshape(150, 200)
    if kind == 'png16 rgb': data = png(200, 150, 16, 2, b''.join(struct.pack('>HHH', v, v // 2, 65535 - v) for v in range(0, 65536, 328)))
    elif kind == 'png16 grey': data = enc(Image.fromarray(g.astype(np.uint16)), 'PNG')
    elif kind == 'tiff16 grey': data = enc(Image.fromarray(g.astype(np.uint16)), 'TIFF')
    elif kind == 'tiff16 big-endian': data = enc(Image.fromarray(g.astype('>u2')), 'TIFF')
    else: data = enc(Image.fromarray(g.astype(np.int32)), 'TIFF')
    src = np.asarray(Image.open(io.BytesIO(data)).convert('I') if kind != 'png16 rgb' else Image.open(io.BytesIO(data)), dtype=float)
    want = src.mean() / (257 if kind != 'png16 rgb' else 1)  # Pillow already gives 8-bit RGB for 16-bit RGB PNGs
    got = np.asarray(decoded(check_image(data)), dtype=float).mean()
    assert abs(got - want) < 2, (kind, got, want)


@pytest.mark.parametrize('lo,hi', [(0.0, 1.0), (0.25, 0.75), (-300.0, 700.0)])
def test_float_tiff_by_its_range(lo, hi):
    "Float pixels in 0..1 are scaled by 255; floats outside 0..1 are mapped from their own min..max (they came out black)."
    a = np.linspace(lo, hi, 200 * 150, dtype=np.float32).reshape(150, 200)
    got = np.asarray(decoded(check_image(enc(Image.fromarray(a), 'TIFF'))), dtype=float)
    want = a * 255 if lo >= 0 and hi <= 1 else (a - lo) / (hi - lo) * 255
    assert abs(got.mean() - want.mean()) < 2 and abs(got.max() - want.max()) < 3


@pytest.mark.parametrize('kind', ['RGBA', 'LA', 'P', 'GIF'])
def test_alpha_is_composited_on_white(kind):
    "Half-transparent red on white is pink; a transparent palette entry is white."
    if kind == 'RGBA': data, want = enc(Image.new('RGBA', (100, 80), (255, 0, 0, 128)), 'PNG'), (255, 127, 127)
    elif kind == 'LA': data, want = enc(Image.new('LA', (100, 80), (0, 128)), 'PNG'), (127, 127, 127)
    else:
        p = Image.new('P', (100, 80), 1); p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        data = enc(p, 'PNG', transparency=bytes([255, 128])) if kind == 'P' else enc(p, 'GIF', transparency=1)
        want = (255, 127, 127) if kind == 'P' else (255, 255, 255)
    px = decoded(check_image(data)).convert('RGB').getpixel((50, 40))
    assert all(abs(a - b) <= 3 for a, b in zip(px, want)), (kind, px)


# ---- 3. EXIF orientation -----------------------------------------------------------------------

def oriented(fmt='JPEG', mode='RGB', orientation=6):
    "A 300x200 picture stored sideways: left half red, right half blue; orientation 6 shows it turned clockwise."
    im = Image.new('RGB', (300, 200), (220, 20, 20)); im.paste((20, 20, 220), (150, 0, 300, 200))
    ex = Image.Exif(); ex[0x0112] = orientation
    return enc(im.convert(mode), fmt, exif=ex)


@pytest.mark.parametrize('resize', [None, 100])
def test_exif_orientation_jpeg(resize):
    "Kept as it came: the bytes keep their EXIF, the sizes are as displayed. Re-encoded: the pixels are turned."
    data = oriented()
    c = check_image(data, ImageRules(resize=resize))
    if resize is None:
        assert (c.data, c.converted) == (data, False)
    else:
        im = decoded(c).convert('RGB')
        assert im.size == (67, 100) and not im.getexif().get(0x0112)
        top, bottom = im.getpixel((33, 10)), im.getpixel((33, 90))
        assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0], (top, bottom)  # the red left half is on top
    assert (c.width, c.height, c.original_width, c.original_height) == ((67, 100, 200, 300) if resize else (200, 300, 200, 300))


@pytest.mark.parametrize('fmt,mode', [('JPEG', 'CMYK'), ('PNG', 'RGB'), ('WEBP', 'RGB'), ('TIFF', 'RGB')])
def test_exif_orientation_when_converted(fmt, mode):
    for o, size in [(6, (200, 300)), (8, (200, 300)), (3, (300, 200)), (1, (300, 200))]:
        c = check_image(oriented(fmt, mode, o))
        assert c.converted and (c.width, c.height) == size and decoded(c).size == size, (fmt, o)


# ---- 4. a JPEG whose header lies ---------------------------------------------------------------

def lie(data, w, h):
    "`data` with the size in its SOF replaced."
    i = next(data.find(m) for m in (b'\xff\xc0', b'\xff\xc1', b'\xff\xc2') if data.find(m) > 0)
    return data[:i + 5] + struct.pack('>HH', h, w) + data[i + 9:]


@pytest.mark.parametrize('kw', [{}, {'progressive': True}, {'subsampling': 0}])
def test_jpeg_whose_header_lies_is_corrupt(kw):
    small = enc(photo(200, 200), quality=90, **kw)
    assert check_image(small).width == 200
    assert error_type(lie(small, 9000, 9000)) == 'corrupt'
    assert error_type(lie(small, 3000, 2000), ImageRules(resize=512)) == 'corrupt'


def valid_jpegs():
    "Legal JPEGs with as little entropy-coded data as they can have: uniform colours, every layout."
    for colour in [(0, 0, 0), (255, 255, 255), (128, 64, 200)]:
        for kw in [{}, {'optimize': True}, {'progressive': True}, {'progressive': True, 'optimize': True},
                   {'subsampling': 0}, {'subsampling': 1}, {'subsampling': 2, 'optimize': True}, {'quality': 1}, {'quality': 100}]:
            yield f'{colour} {kw}', enc(Image.new('RGB', (64, 64), colour), **kw)
            yield f'{colour} {kw} 1000x700', enc(Image.new('RGB', (1000, 700), colour), **kw)
        yield f'{colour} grey', enc(Image.new('L', (77, 65), colour[0]), optimize=True)
        yield f'{colour} grey progressive', enc(Image.new('L', (640, 480), colour[0]), optimize=True, progressive=True)
    yield 'cmyk', enc(Image.new('CMYK', (300, 200), (0, 0, 0, 0)), optimize=True)
    yield 'large grey', enc(Image.new('L', (6000, 5000), 255), optimize=True, progressive=True)
    yield 'large', enc(Image.new('RGB', (5000, 4000), 0), optimize=True)
    yield 'photo', enc(photo(), quality=85)


def test_valid_jpegs_are_never_refused():
    for name, data in valid_jpegs():
        lay = images.jpeg_layout(data)
        assert lay.end == len(data) and 0 < lay.least <= lay.entropy, (name, lay)
        c = check_image(data)
        im = Image.open(io.BytesIO(data))
        assert (c.width, c.height) == im.size and decoded(c).size == im.size, name


# ---- 5. trailing garbage -----------------------------------------------------------------------

@pytest.mark.parametrize('kw', [{}, {'progressive': True}, {'restart_marker_blocks': 4}])
def test_trailing_garbage_is_cut_at_eoi(kw):
    good = enc(photo(400, 300), quality=80, **kw)
    html = b'<!doctype html><html><body>' + b'\xff\xd9 not an image ' * 50 + b'</body></html>'
    c = check_image(good + html)
    assert (c.data, c.converted, c.width) == (good, False, 400)
    assert images.jpeg_layout(good + html).end == len(good)
    assert decoded(check_image(good + html, ImageRules(resize=200))).size == (200, 150)
    assert error_type(good[:len(good) // 2] + b'<html><body>gone</body></html>') == 'corrupt'  # cut off in the middle: still corrupt


def test_jpeg_layout_of_broken_files():
    "No EOI, a length past the end, a file of a few bytes: no end found, nothing raised."
    good = enc(photo(100, 80))
    for data in [good[:-2], good[:30], b'\xff\xd8\xff', b'\xff\xd8\xff\xe0\xff\xff' + b'\0' * 10]:
        assert images.jpeg_layout(data).end is None


def test_stray_bytes_and_mpo():
    "Stray bytes between segments are skipped as libjpeg skips them; an MPO (two pictures) keeps its first."
    good = enc(photo(200, 150))
    i = good.find(b'\xff\xdb')
    stray = good[:i] + b'\x00\x00junk' + good[i:]
    a, b = images.jpeg_layout(good), images.jpeg_layout(stray)
    assert (b.end, b.entropy, b.least) == (len(stray), a.entropy, a.least)
    c = check_image(stray)
    assert (c.width, c.height, c.converted) == (200, 150, False)
    buf = io.BytesIO()
    Image.new('RGB', (200, 150), 'red').save(buf, 'MPO', save_all=True, append_images=[Image.new('RGB', (200, 150), 'blue')])
    mpo = buf.getvalue()
    c = check_image(mpo)
    assert len(c.data) < len(mpo) and decoded(c).getpixel((5, 5))[0] > 200  # the first picture, whole


# ---- 6. no DecompressionBombWarning ------------------------------------------------------------

def test_no_bomb_warning_and_no_filter_change():
    "A 9500x9500 image passes our rules: Pillow's bomb warning (at open) must not reach the user, whose filters stay as they were."
    data = png(9500, 9500, 1, 0, b'\x55' * (9500 // 8 + 1))
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert error_type(data, ImageRules(min_size=9600)) == 'too_small'  # the header alone: cheap
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)], caught
    assert warnings.filters == before


def test_no_bomb_warning_from_a_tiff_load():
    "Pillow's TIFF loader checks the size again as it allocates the pixels; that one is silent too, even with warnings as errors."
    tiff = enc(Image.new('1', (9500, 9500), 1), 'TIFF', compression='group4')
    with warnings.catch_warnings():
        warnings.simplefilter('error', Image.DecompressionBombWarning)
        c = check_image(tiff, ImageRules(resize=500))
    assert (c.width, c.height) == (500, 500) and decoded(c).getpixel((5, 5)) > 250


# ---- end to end through the demo server --------------------------------------------------------

def test_odd_images_through_the_demo_server(tmp_path):
    "Odd images served on 127.0.0.1 and run through the downloader's row function: saved right, or corrupt."
    from laion_nb import demo
    from laion_nb.download import DownloadConfig, Downloader
    good = enc(photo(400, 300), quality=80)
    bodies = {'garbage': good + b'<html>' + b'x' * 5000, 'lie': lie(good, 9000, 9000), 'turned': oriented(),
              'png16': enc(Image.fromarray(np.full((100, 120), 127 * 257, np.uint16)), 'PNG')}

    class Odd(demo._Handler):
        def r_odd(self, i, ext, n): self._send(200, bodies[list(bodies)[i]])

    with demo.ImageServer() as srv:
        srv._httpd.RequestHandlerClass = Odd
        d = Downloader(DownloadConfig(output_dir=tmp_path, timeout=2, retries=0, allow_private_networks=True))
        got = {name: d.one(i, srv.url(f'odd/{i}.jpg'), name) for i, name in enumerate(bodies)}
    assert (got['garbage'].bytes, got['garbage'].width) == (len(good), 400)
    assert (tmp_path/got['garbage'].path).read_bytes() == good
    assert got['lie'].error_type == 'corrupt'
    assert (got['turned'].width, got['turned'].height) == (200, 300)
    saved = Image.open(tmp_path/got['png16'].path)
    assert abs(np.asarray(saved, dtype=float).mean() - 127) < 2
