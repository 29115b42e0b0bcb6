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
    assert grew < images._PIXEL_BUDGET.limit + 200 * 2**20


def test_budget_waits_and_runs_big_alone():
    "Checks in flight never hold more than the limit, except one image larger than the limit, which runs alone."
    b, lock, inside, seen = images._PixelBudget(100), threading.Lock(), [], []
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
    b, release = images._PixelBudget(100), threading.Event()
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
        lay = images._jpeg_layout(data)
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
    assert images._jpeg_layout(good + html).end == len(good)
    assert decoded(check_image(good + html, ImageRules(resize=200))).size == (200, 150)
    assert error_type(good[:len(good) // 2] + b'<html><body>gone</body></html>') == 'corrupt'  # cut off in the middle: still corrupt


def test_jpeg_layout_of_broken_files():
    "No EOI, a length past the end, a file of a few bytes: no end found, nothing raised."
    good = enc(photo(100, 80))
    for data in [good[:-2], good[:30], b'\xff\xd8\xff', b'\xff\xd8\xff\xe0\xff\xff' + b'\0' * 10]:
        assert images._jpeg_layout(data).end is None


def test_stray_bytes_and_mpo():
    "Stray bytes between segments are skipped as libjpeg skips them; an MPO (two pictures) keeps its first."
    good = enc(photo(200, 150))
    i = good.find(b'\xff\xdb')
    stray = good[:i] + b'\x00\x00junk' + good[i:]
    a, b = images._jpeg_layout(good), images._jpeg_layout(stray)
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
    from laion_nb.download import DownloadConfig
    from laion_nb.pool import Downloader
    good = enc(photo(400, 300), quality=80)
    bodies = {'garbage': good + b'<html>' + b'x' * 5000, 'lie': lie(good, 9000, 9000), 'turned': oriented(),
              'png16': enc(Image.fromarray(np.full((100, 120), 127 * 257, np.uint16)), 'PNG')}

    class Odd(demo._Handler):
        def r_odd(self, i, ext, n): self._send(200, bodies[list(bodies)[i]])

    with demo.ImageServer() as srv:
        srv._httpd.RequestHandlerClass = Odd
        d = Downloader(DownloadConfig.build(output_dir=tmp_path, timeout=2, retries=0, allow_private_networks=True))
        got = {name: d.download_row(i, srv.url(f'odd/{i}.jpg'), name) for i, name in enumerate(bodies)}
    assert (got['garbage'].bytes, got['garbage'].width) == (len(good), 400)
    assert (tmp_path/got['garbage'].path).read_bytes() == good
    assert got['lie'].error_type == 'corrupt'
    assert (got['turned'].width, got['turned'].height) == (200, 300)
    saved = Image.open(tmp_path/got['png16'].path)
    assert abs(np.asarray(saved, dtype=float).mean() - 127) < 2


# ---- 7. resize: the modes, the sizes they promise, least work ------------------------------------

import functools
from fractions import Fraction

from PIL import ImageOps


def promised(w, h, n, mode):
    "The size `mode` promises for a `w` x `h` picture (as displayed), computed apart from laion_nb: exact fractions, halves up."
    near = lambda x: max(1, int(Fraction(x) + Fraction(1, 2)))  # floor(x + 1/2): the nearest integer, halves up
    if mode == 'center_crop': return (min(w, h, n),) * 2
    side = max(w, h) if mode == 'longest' else min(w, h)
    if side <= n: return w, h
    return near(Fraction(w * n, side)), near(Fraction(h * n, side))


@functools.lru_cache(maxsize=256)  # each picture is made once for the three modes
def body(fmt, w, h, seed=1):
    im = photo(w, h, seed)
    if fmt == 'JPEG progressive': return enc(im, 'JPEG', quality=85, progressive=True)
    if fmt == 'JPEG grey': return enc(im.convert('L'), 'JPEG', quality=85)
    if fmt == 'JPEG CMYK': return enc(im.convert('CMYK'), 'JPEG', quality=85)
    if fmt == 'GIF': return enc(im.quantize(256), 'GIF')
    if fmt == 'PNG RGBA': return enc(im.convert('RGBA'), 'PNG')
    return enc(im, fmt, **({'quality': 85} if fmt in ('JPEG', 'WEBP') else {}))


SIZES = [(1200, 800), (1001, 333), (333, 1001), (768, 1001), (777, 1201), (1600, 1200), (640, 480), (500, 300), (300, 200), (385, 385)]  # 768x1001 and 777x1201: off by one on the old path (thumbnail() after a draft)


@pytest.mark.parametrize('mode', ['longest', 'shortest', 'center_crop'])
@pytest.mark.parametrize('fmt', ['JPEG', 'JPEG progressive', 'JPEG grey', 'JPEG CMYK', 'PNG', 'PNG RGBA', 'WEBP', 'GIF'])
def test_resize_gives_the_promised_size(fmt, mode):
    "Every format, every mode, odd sizes: a JPEG that decodes in full, exactly the promised size, never enlarged."
    n = 384
    for w, h in SIZES:
        data = body(fmt, w, h)
        c = check_image(data, ImageRules(resize=n, resize_mode=mode))
        want = promised(w, h, n, mode)
        im = decoded(c)
        assert im.format == 'JPEG' and im.mode in ('RGB', 'L'), (fmt, w, h)
        assert (c.width, c.height) == im.size == want, (fmt, mode, (w, h), im.size, want)
        assert (c.original_width, c.original_height) == (w, h)
        assert max(want) <= max(w, h) and min(want) <= min(w, h)  # never enlarged
        if mode == 'center_crop': assert want[0] == want[1] == min(w, h, n)
        if mode == 'shortest' and min(w, h) > n: assert min(im.size) == n
        if mode == 'longest' and max(w, h) > n: assert max(im.size) == n


def test_rounding_is_nearest_halves_up_not_pillows():
    "The size is computed from the size as it came, halves up; Pillow's thumbnail rounds to the aspect's nearest and can differ."
    rules = ImageRules(resize=100, min_size=1)
    differs = []
    for w in range(101, 700):
        for h in (64, 99, 150, 201, 333):
            assert rules.plan(w, h)[0] == promised(w, h, 100, 'longest'), (w, h)
            t = Image.new('L', (w, h)); t.thumbnail((100, 100))
            if t.size != rules.plan(w, h)[0]: differs.append(((w, h), t.size, rules.plan(w, h)[0]))
    assert rules.plan(200, 100)[0] == (100, 50) and ImageRules(resize=64, min_size=1).plan(128, 65)[0] == (64, 33)  # 32.5 -> 33
    assert differs, 'Pillow rounds like us after all: the notebook says otherwise'
    print(len(differs), 'sizes where thumbnail() differs, e.g.', differs[:3])


def displayed_and_stored(orientation, w=400, h=600):
    "A picture as displayed (w x h, red top-left quarter, blue bottom-right) and the sideways JPEG that shows it with `orientation`."
    shown = Image.new('RGB', (w, h), (235, 235, 235))
    shown.paste((220, 20, 20), (0, 0, w // 2, h // 2)); shown.paste((20, 20, 220), (w // 2, h // 2, w, h))
    undo = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}[orientation]
    ex = Image.Exif(); ex[0x0112] = orientation
    data = enc(shown.transpose(undo), quality=92, exif=ex)
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size == (w, h)  # viewers show `shown`
    return shown, data


@pytest.mark.parametrize('orientation', [6, 8, 3])
@pytest.mark.parametrize('mode', ['longest', 'shortest', 'center_crop'])
def test_resized_pictures_are_upright(orientation, mode):
    "The target applies to the picture as displayed, and the saved pixels are upright: red stays top left, blue bottom right."
    shown, data = displayed_and_stored(orientation)
    n = 240
    c = check_image(data, ImageRules(resize=n, resize_mode=mode))
    im = decoded(c).convert('RGB')
    assert (c.width, c.height) == im.size == promised(400, 600, n, mode) and not im.getexif().get(0x0112)
    W, H = im.size
    tl, br = im.getpixel((W // 8, H // 8 if mode != 'center_crop' else H // 3)), im.getpixel((W - 1 - W // 8, H - 1 - (H // 8 if mode != 'center_crop' else H // 3)))
    assert tl[0] > 150 > tl[2] and br[2] > 150 > br[0], (orientation, mode, tl, br)


@pytest.mark.parametrize('mode,w,h', [('longest', 300, 200), ('longest', 384, 100), ('shortest', 1000, 300), ('shortest', 384, 384),
                                      ('center_crop', 300, 300), ('center_crop', 384, 384)])
def test_jpeg_within_the_target_is_kept_byte_for_byte(mode, w, h):
    "A JPEG (RGB or grey) the mode would leave as it is: its bytes, as they came; a CMYK one is converted."
    for data in (body('JPEG', w, h), body('JPEG grey', w, h)):
        c = check_image(data, ImageRules(resize=384, resize_mode=mode))
        assert (c.data, c.converted, c.width, c.height) == (data, False, w, h), (mode, w, h)
    assert check_image(body('JPEG CMYK', w, h), ImageRules(resize=384, resize_mode=mode)).converted
    c = check_image(oriented(), ImageRules(resize=384, resize_mode='longest'))  # sideways, within the target: kept, sizes as displayed
    assert (c.converted, c.width, c.height) == (False, 200, 300)


def test_center_crop_of_a_small_picture_is_its_centre_square_not_enlarged():
    "A 300x200 picture at 384: its middle 200x200 (blue and green margins cut off), at its own size."
    im = Image.new('RGB', (300, 200), (220, 20, 20)); im.paste((20, 20, 220), (0, 0, 50, 200)); im.paste((20, 200, 20), (250, 0, 300, 200))
    for data in (enc(im, quality=95), enc(im, 'PNG')):
        c = check_image(data, ImageRules(resize=384, resize_mode='center_crop'))
        out = np.asarray(decoded(c).convert('RGB'), dtype=int)
        assert (c.width, c.height, c.converted) == (200, 200, True) and out.shape == (200, 200, 3)
        assert (out[:, 3:-3, 0] > 150).all() and (out[:, 3:-3, 2] < 90).all()  # all red: the margins were cut, evenly
    c = check_image(enc(im.resize((900, 600)), quality=95), ImageRules(resize=100, resize_mode='center_crop'))
    out = np.asarray(decoded(c).convert('RGB'), dtype=int)
    assert out.shape == (100, 100, 3) and (out[:, 3:-3, 0] > 150).all()


def test_resize_decodes_no_more_than_the_target_needs():
    "The DCT scale is the least one at or above the target: for the longest and shortest modes on the whole picture, for center_crop on its short side."
    assert images._dct_scale((2048, 1536), (384, 288)) == 4 and images._dct_scale((640, 480), (384, 288)) == 1
    assert images._dct_scale((1536, 1536), (384, 384)) == 4 and images._dct_scale((4000, 1000), (1536, 384)) == 2
    assert images._dct_scale((3200, 2400), (384, 288)) == 8 and images._dct_scale((1200, 1200), (384, 384)) == 2
    data = body('JPEG', 3200, 800)  # a panorama: the short side decides for shortest and center_crop
    for mode, size in [('longest', (400, 100)), ('shortest', (1600, 400)), ('center_crop', (1600, 400))]:
        im = images._open('JPEG', data)
        (tw, th), box = ImageRules(resize=384, resize_mode=mode).plan(3200, 800)
        region = (3200, 800) if box is None else (box[2] - box[0], box[3] - box[1])
        k = images._draft(im, images._dct_scale(region, (tw, th)))
        im.load()
        assert im.size == size and k == 3200 // size[0], (mode, im.size)
        assert decoded(check_image(data, ImageRules(resize=384, resize_mode=mode))).size == (tw, th)


@pytest.mark.parametrize('mode', ['longest', 'shortest', 'center_crop'])
def test_damaged_pictures_are_still_corrupt_when_resized(mode):
    rules = ImageRules(resize=128, resize_mode=mode)
    for fmt in ('JPEG', 'JPEG progressive', 'PNG', 'WEBP'):
        good = body(fmt, 1200, 800)
        assert error_type(good[:len(good) // 2], rules) == 'corrupt', fmt
    assert error_type(lie(enc(photo(300, 200)), 3000, 2000), rules) == 'corrupt'


def test_cli_resize_mode_through_the_demo_server(tmp_path):
    "`--resize 100 --resize-mode center_crop`: every saved file is 100x100 (or its own short side), and the record keeps the original size."
    import pandas as pd
    from laion_nb import demo, records
    from laion_nb.cli import main
    with demo.ImageServer() as srv:
        urls = [srv.url(f'img/{i}.{ext}') for i, ext in enumerate(['jpg', 'png', 'webp', 'gif', 'jpg', 'jpg'])]
        pd.DataFrame({'url': urls, 'caption': ['x'] * len(urls)}).to_parquet(tmp_path/'d.parquet')
        assert main(['--metadata', str(tmp_path/'d.parquet'), '--output-dir', str(tmp_path/'out'), '--resize', '100',
                     '--resize-mode', 'center_crop', '--allow-private-networks', '--quiet', '--timeout', '2', '--processes', '1']) in (0, None)
    saved = records.read_saved(tmp_path/'out')
    assert len(saved) == len(urls)
    for r in saved.to_dict('records'):
        im = Image.open(tmp_path/'out'/r['path']); im.load()
        side = min(r['original_width'], r['original_height'], 100)
        assert im.format == 'JPEG' and im.size == (r['width'], r['height']) == (side, side), r
    line = json.loads((tmp_path/'out'/records.SAVED_FILE).read_text().splitlines()[0])
    assert {'original_width', 'original_height', 'width', 'height'} <= set(line)


@pytest.mark.parametrize('mode', ['longest', 'shortest', 'center_crop'])
def test_resized_pixels_stay_faithful(mode):
    "Resized too, a 16-bit PNG keeps its brightness and half-transparent red comes out pink on white."
    rules = ImageRules(resize=100, resize_mode=mode)
    g16 = enc(Image.fromarray(np.full((300, 500), 127 * 257, np.uint16)), 'PNG')
    c = check_image(g16, rules)
    assert c.converted and abs(np.asarray(decoded(c), dtype=float).mean() - 127) < 2
    c = check_image(enc(Image.new('RGBA', (500, 300), (255, 0, 0, 128)), 'PNG'), rules)
    px = decoded(c).convert('RGB').getpixel((c.width // 2, c.height // 2))
    assert all(abs(a - b) <= 3 for a, b in zip(px, (255, 127, 127))), px
    assert (c.width, c.height) == promised(500, 300, 100, mode)
