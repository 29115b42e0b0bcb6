"""Benchmark: CPU per image to check, resize and encode, by codec library, format, size and resize mode.

Run by hand, in a venv that has the optional codecs (never the project's own venv):

    python3 -m venv /work/codec-venv
    /work/codec-venv/bin/pip install -e . pyvips pyvips-binary opencv-python-headless simplejpeg
    /work/codec-venv/bin/python bench/bench_codecs.py [--sizes 256 640 1024 2048] [--target 384] [--seconds 0.3]

Photo-like noisy pictures (smooth shapes plus noise, 4:3) are made with Pillow at each size (longest side)
and saved as JPEG (q85), PNG, WebP (q80) and GIF (256 colours). Each path turns one into a JPEG (q95, 4:2:0)
resized to `--target` in each mode, on one thread; the table gives CPU ms per image (`time.process_time`):

- `main`: laion_nb's `check_image` at git `--baseline` (default `main`; 936a7a0 is the last before the resize modes),
  longest side only, loaded with `git show`.
- `pillow`: laion_nb's `check_image` of this tree (draft to the least scale the target needs, one bicubic).
- `vips`: libvips `thumbnail_buffer` (shrink-on-load for JPEG and WebP), `jpegsave_buffer`.
- `cv2`: OpenCV `imdecode` (`IMREAD_REDUCED_COLOR_2/4/8` for a JPEG, at the scale laion_nb's draft picks),
  crop, `resize` with `INTER_AREA`, `imencode`.
- `simplejpeg`: JPEG only: `decode_jpeg` with `min_width/min_height` (DCT-scaled), OpenCV `resize`, `encode_jpeg`.

The three other libraries get laion_nb's cheap checks first (sniff, the JPEG marker walk, the header
through Pillow): what a fast path inside laion_nb would still run. They are skipped when not importable.
"""
import argparse, datetime, io, os, platform, subprocess, sys, time, types
from pathlib import Path

os.environ.setdefault('VIPS_CONCURRENCY', '1')  # one thread everywhere (libvips reads this at import)
os.environ.setdefault('OMP_NUM_THREADS', '1')
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
from laion_nb import images
from laion_nb.images import ImageRules, check_image

MODES = ('longest', 'shortest', 'center_crop')
FORMATS = ('JPEG', 'PNG', 'WEBP', 'GIF')


def photo(w, h, seed):
    "A photo-like RGB picture: smooth shapes and a little noise."
    y, x = np.mgrid[0:h, 0:w]
    s = 1024 / max(w, h)  # the same shapes at every size
    a = np.stack([128 + 100*np.sin(x*s/50), 128 + 100*np.cos(y*s/40), (x + y)*s/8 % 256], -1)
    a += np.random.default_rng(seed).normal(0, 6, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def encode(im, fmt):
    buf = io.BytesIO()
    if fmt == 'JPEG': im.save(buf, 'JPEG', quality=85)
    elif fmt == 'WEBP': im.save(buf, 'WEBP', quality=80)
    elif fmt == 'GIF': im.quantize(256).save(buf, 'GIF')
    else: im.save(buf, 'PNG')
    return buf.getvalue()


def main_check_image(ref='main'):
    "`check_image` of laion_nb/images.py at git `ref`, loaded as a module beside this tree's."
    try: src = subprocess.run(['git', '-C', str(ROOT), 'show', f'{ref}:laion_nb/images.py'], capture_output=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError): return None
    mod = sys.modules['laion_nb._images_main'] = types.ModuleType('laion_nb._images_main'); mod.__package__ = 'laion_nb'
    exec(compile(src, f'{ref}:laion_nb/images.py', 'exec'), mod.__dict__)
    return lambda data, mode, n: mod.check_image(data, mod.ImageRules(resize=n)).data if mode == 'longest' else None


def header(data):
    "laion_nb's cheap checks, as a fast path would run them: sniff, marker walk, size from the header."
    fmt = images._sniff(data)
    if fmt == 'JPEG': images._jpeg_layout(data)
    return fmt, images._open(fmt, data).size


def pillow(data, mode, n): return check_image(data, ImageRules(resize=n, resize_mode=mode)).data


def make_vips():
    try: import pyvips
    except (ImportError, OSError): return None
    pyvips.cache_set_max(0)  # no cached results: every call decodes
    def run(data, mode, n):
        fmt, (w, h) = header(data)
        (tw, th), _ = ImageRules(resize=n, resize_mode=mode).plan(w, h)
        kw = {'crop': 'centre'} if mode == 'center_crop' else {}
        im = pyvips.Image.thumbnail_buffer(data, tw, height=th, size='down', fail_on='error', **kw)
        if im.hasalpha(): im = im.flatten(background=255)
        return im.jpegsave_buffer(Q=95, subsample_mode='on')
    return run


def make_cv2():
    try: import cv2
    except ImportError: return None
    cv2.setNumThreads(1)
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
    def run(data, mode, n):
        fmt, (w, h) = header(data)
        (tw, th), box = ImageRules(resize=n, resize_mode=mode).plan(w, h)
        region = (w, h) if box is None else (box[2] - box[0], box[3] - box[1])
        k = images._dct_scale(region, (tw, th)) if fmt == 'JPEG' else 1
        a = cv2.imdecode(np.frombuffer(data, np.uint8), flags[k])
        if box is not None: a = a[box[1] // k:box[3] // k, box[0] // k:box[2] // k]
        if a.shape[:2] != (th, tw): a = cv2.resize(a, (tw, th), interpolation=cv2.INTER_AREA)
        return cv2.imencode('.jpg', a, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    return run


def make_simplejpeg():
    try: import cv2, simplejpeg
    except ImportError: return None
    def run(data, mode, n):
        fmt, (w, h) = header(data)
        if fmt != 'JPEG': return None
        (tw, th), box = ImageRules(resize=n, resize_mode=mode).plan(w, h)
        rw, rh = (w, h) if box is None else (box[2] - box[0], box[3] - box[1])
        a = simplejpeg.decode_jpeg(data, 'RGB', min_width=-(-tw * w // rw), min_height=-(-th * h // rh))
        if box is not None:
            k = w / a.shape[1]
            a = a[int(box[1] / k):int(box[3] / k), int(box[0] / k):int(box[2] / k)]
        if a.shape[:2] != (th, tw): a = cv2.resize(a, (tw, th), interpolation=cv2.INTER_AREA)
        return simplejpeg.encode_jpeg(np.ascontiguousarray(a), 95, 'RGB', '420')
    return run


def cpu_ms(f, bodies, mode, n, seconds, repeats=5):
    "CPU ms per image of `f` over `bodies`: the least of `repeats` rounds of `seconds` each (the machine is shared); None if `f` does not do it."
    if f(bodies[0], mode, n) is None: return None
    best = float('inf')
    for _ in range(repeats):
        count, t0 = 0, time.process_time()
        while time.process_time() - t0 < seconds:
            for b in bodies: f(b, mode, n)
            count += len(bodies)
        best = min(best, (time.process_time() - t0) / count * 1000)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--sizes', type=int, nargs='+', default=[256, 640, 1024, 2048])
    p.add_argument('--formats', nargs='+', default=list(FORMATS))
    p.add_argument('--modes', nargs='+', default=list(MODES))
    p.add_argument('--target', type=int, default=384)
    p.add_argument('--baseline', default='main', help='git ref of the `main` column (default: %(default)s)')
    p.add_argument('--seconds', type=float, default=0.1, help='CPU seconds per round of a cell (5 rounds, the least counts)')
    a = p.parse_args(argv)
    paths = {'main': main_check_image(a.baseline), 'pillow': pillow, 'vips': make_vips(), 'cv2': make_cv2(), 'simplejpeg': make_simplejpeg()}
    paths = {k: v for k, v in paths.items() if v is not None}
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor())
    print(f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, '
          f'Pillow {Image.__version__}; one thread; resize to {a.target}, JPEG q95; CPU ms per image, least of 5 rounds\n')
    for mode in a.modes:
        print(f'**{mode}**\n\n| format | size | ' + ' | '.join(paths) + ' |\n|---|---|' + '---|' * len(paths))
        for fmt in a.formats:
            for s in a.sizes:
                bodies = [encode(photo(s, s * 3 // 4, seed), fmt) for seed in range(3)]
                cells = [cpu_ms(f, bodies, mode, a.target, a.seconds) for f in paths.values()]
                print(f'| {fmt} | {s}x{s * 3 // 4} | ' + ' | '.join('-' if c is None else f'{c:.2f}' for c in cells) + ' |', flush=True)
        print()


if __name__ == '__main__':
    main()
