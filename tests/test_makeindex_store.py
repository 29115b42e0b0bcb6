"""makeindex on downloads in object storage and in WebDataset shards, against moto's S3 server on 127.0.0.1 (through s3fs).

Each output is built by hand with the store API, the way a run writes it: images put, records as parts, `finalize`;
WebDataset shards with `TarShardWriter`. The endpoint and credentials come from the environment, as a user sets them.
"""
import json, os, subprocess, tarfile
from pathlib import Path

import fsspec
import pytest

from _s3 import s3_fixtures

from laion_nb.makeindex import IndexConfig, LaionIndex, MakeIndexError, makeindex
from laion_nb.makeindex import _find_local_images as find_local_images
from laion_nb.records import FAILED_LOG, SAVED_FILE, BadRecordError, Failed, RecordLog, Saved
from laion_nb.store import TARS_DIR, PartWriter, TarShardWriter, finalize, list_shards, open_store

from test_makeindex import MAKEINDEX, caption, objs, save_images, url, write_dump

BUCKET = 'laion-nb-makeindex'


s3, run_url = s3_fixtures(BUCKET)


FAILURES = {5: ('http_status', 404), 7: ('timeout', None), 9: ('blocked_address', None), 11: ('http_status', 503), 13: ('not_image', None)}
SAVED = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]


def failures():
    return [Failed(i, url(i), t, s, f'{t} {s or ""}'.strip(), 1) for i, (t, s) in FAILURES.items()]


def records(out):
    "The Saved records of the local download `out`, as written."
    return [Saved(**json.loads(line)) for line in open(out/SAVED_FILE, encoding='utf-8')]


def cfg(root, download_dir, **kw):
    return IndexConfig(data_root=root, esc50=None, laion=LaionIndex(download_dir=download_dir, **kw))


def cli(*argv, env=None):
    return subprocess.run([str(MAKEINDEX), *map(str, argv)], capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def dump(tmp_path):
    "A data root with a 24-row dump, and a local download of it (10 real JPEGs, 5 failures) to compare with."
    root = tmp_path/'data'
    write_dump(root/'laion-1m-vit-h-14', 24, shards=2)
    out = tmp_path/'local'
    save_images(out, SAVED)
    with RecordLog(out) as log:
        for f in failures(): log.failed(f)
    return root, out


def put_run(s, out):
    "The images and saved records of the local download `out`, put on the store `s` as a run writes them (not finalized)."
    with PartWriter(s, '00000') as w:
        for r in records(out): s.put(r.path, (out/r.path).read_bytes()); w.saved(r)


def test_images_in_s3_index_like_the_local_download(dump, run_url):
    "The same download on S3: the same lines row by row, each image as its object URL, which opens to the same bytes."
    root, out = dump
    s = open_store(run_url)
    with PartWriter(s, '00000', every=4) as w:
        for r in records(out): s.put(r.path, (out/r.path).read_bytes()); w.saved(r)
        for f in failures(): w.failed(f)
    finalize(s)
    s.delete('images/4.jpg'); (out/'images'/'4.jpg').unlink()  # deleted after the run: listed, gone, its URL used
    ref = makeindex(cfg(root, out, with_index=True)).laion
    want = [{**o, 'image': o['image'].replace(str(out/'images'), f'{run_url}/images')} if 'image' in o else o
            for o in objs(root/'laion_train.jsonl')]
    rep = makeindex(cfg(root, run_url, with_index=True)).laion
    got = objs(root/'laion_train.jsonl')
    assert got == want
    assert [o['index'] for o in got if 'image' in o] == [i for i in SAVED if i != 4]
    assert all(o['image'].startswith('s3://') for o in got if 'image' in o)
    assert (rep.local, rep.remote, rep.gone, rep.failed, rep.refused) == (ref.local, ref.remote, 1, {'http 404': 1, 'not_image': 1},
                                                                          {'blocked_address': 1})
    for o in got[:6]:
        if 'image' in o:
            with fsspec.open(o['image']) as f: assert f.read() == (out/'images'/f'{o["index"]}.jpg').read_bytes()
    assert rep.shards is None and not (root/'laion_train_shards.json').exists()
    found = find_local_images(open_store(run_url))  # a store's records are its finalized files
    assert found.index.tolist() == SAVED and found.present.tolist() == [i != 4 for i in SAVED]
    before = (root/'laion_train.jsonl').read_bytes()
    done = cli('--laion', '--data-root', root, '--download-dir', run_url, '--with-index')
    assert done.returncode == 0, done.stderr
    assert (root/'laion_train.jsonl').read_bytes() == before and '9 with a downloaded image' in done.stdout


def shard_of(i):
    return '00000' if i < 10 else '00001'


def write_shards(s, out):
    "The local download's saved rows as two committed WebDataset shards on `s`, its failures as parts; finalized."
    for shard in ('00000', '00001'):
        with TarShardWriter(s, shard) as t:
            for r in records(out):
                if shard_of(r.index) == shard: t.add(r, (out/r.path).read_bytes())
    with PartWriter(s, '00000') as w:
        for f in failures(): w.failed(f)


def test_webdataset_on_s3_lists_its_shards_and_points_at_each_sample(dump, run_url):
    "Saved rows point at their sample (tar://i.jpg::<shard url>); laion_train_shards.json lists the committed shards with their counts."
    root, out = dump
    s = open_store(run_url)
    write_shards(s, out)
    s.put(f'{TARS_DIR}/00002.tar', b'a tar whose parquet never came')  # not committed: neither listed nor used
    finalize(s)
    rep = makeindex(cfg(root, run_url, with_index=True)).laion
    got = objs(root/'laion_train.jsonl')
    images = {o['index']: o['image'] for o in got if 'image' in o}
    assert images == {i: f'tar://{i}.jpg::{run_url}/{TARS_DIR}/{shard_of(i)}.tar' for i in SAVED}
    assert {o['index'] for o in got if 'image_url' in o} == set(range(24)) - set(SAVED) - {5, 9, 13}
    shards = json.loads((root/'laion_train_shards.json').read_text(encoding='utf-8'))
    assert shards == {'pattern': f'{run_url}/{TARS_DIR}/{{00000..00001}}.tar', 'samples': 10, 'shards': list_shards(s)}
    assert [(d['url'], d['samples']) for d in shards['shards']] == [(f'{run_url}/{TARS_DIR}/00000.tar', 5), (f'{run_url}/{TARS_DIR}/00001.tar', 5)]
    assert rep.shards == root/'laion_train_shards.json' and rep.local == 10
    for i, image in images.items():  # what the JSONL says, read back: by hand with tarfile, and in one fsspec call
        member, tar_url = image[len('tar://'):].split('::')
        with fsspec.open(tar_url) as f, tarfile.open(fileobj=f) as tar:
            assert tar.extractfile(member).read() == (out/'images'/f'{i}.jpg').read_bytes()
            assert tar.extractfile(f'{i}.txt').read().decode() == caption(i)
        with fsspec.open(image) as f: assert f.read() == (out/'images'/f'{i}.jpg').read_bytes()
    wds = pytest.importorskip('webdataset')
    from braceexpand import braceexpand
    keys = []
    for shard_url in braceexpand(shards['pattern']):  # the pattern, as a WebDataset loader expands it
        with fsspec.open(shard_url) as f:
            keys += [int(x['__key__']) for x in wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([{'stream': f, 'url': shard_url}]))]
    assert keys == sorted(images)
    before = {n: (root/n).read_bytes() for n in ('laion_train.jsonl', 'laion_train_shards.json')}
    done = cli('--laion', '--data-root', root, '--download-dir', run_url, '--with-index')
    assert done.returncode == 0, done.stderr
    assert {n: (root/n).read_bytes() for n in before} == before
    assert f'WebDataset: 2 shards, 10 samples -> {root/"laion_train_shards.json"} ({shards["pattern"]})' in done.stdout


def test_a_run_not_finalized_is_refused_with_what_to_run(dump, run_url):
    "Parts (or committed shards) without image_paths.jsonl: an error naming the location and finalize; an empty location too."
    root, out = dump
    s = open_store(run_url)
    with pytest.raises(MakeIndexError, match=f'{run_url}: no download there'): makeindex(cfg(root, run_url))
    put_run(s, out)
    with pytest.raises(MakeIndexError, match=f'{run_url}: the download there is not finalized') as e: makeindex(cfg(root, run_url))
    assert f"finalize('{run_url}')" in str(e.value) and f'--output-dir {run_url}' in str(e.value)
    assert not (root/'laion_train.jsonl').exists()
    done = cli('--laion', '--data-root', root, '--download-dir', run_url)
    assert done.returncode == 2 and done.stderr.count('\n') == 1 and 'not finalized' in done.stderr and 'Traceback' not in done.stderr
    finalize(s)
    assert makeindex(cfg(root, run_url)).laion.local == len(SAVED)
    w2 = open_store(f'{run_url}-wds')
    with TarShardWriter(w2, '00000') as t: t.add(records(out)[0], b'jpeg')
    with pytest.raises(MakeIndexError, match='not finalized'): makeindex(cfg(root, w2.location))


def test_corrupt_line_on_s3_names_the_object(dump, run_url):
    "A bad line of the finalized image_paths.jsonl is named by its URL and line, not by a temporary copy; --skip-bad-lines goes on."
    root, out = dump
    s = open_store(run_url)
    put_run(s, out)
    finalize(s)
    s.put(SAVED_FILE, s.get(SAVED_FILE) + b'{"index": 3, "path"\n')
    with pytest.raises(BadRecordError, match=f'{run_url}/{SAVED_FILE}, line 11'): makeindex(cfg(root, run_url))
    assert makeindex(cfg(root, run_url, skip_bad_lines=True)).laion.bad_lines == [11]


def test_storage_options_flag_says_where_s3_is(dump, s3, run_url):
    "With no endpoint in the environment, --storage-options JSON reaches the filesystem; bad JSON or a local dir is a one-line error."
    root, out = dump
    s = open_store(run_url)
    put_run(s, out)
    finalize(s)
    env = {k: v for k, v in os.environ.items() if k != 'AWS_ENDPOINT_URL'}
    done = cli('--laion', '--data-root', root, '--download-dir', run_url, '--storage-options', json.dumps({'endpoint_url': s3}), env=env)
    assert done.returncode == 0, done.stderr
    assert [o['image'] for o in objs(root/'laion_train.jsonl') if 'image' in o] == [f'{run_url}/images/{i}.jpg' for i in SAVED]
    for bad, says in [('{"endpoint_url"', 'not JSON'), ('[1]', 'not a JSON object')]:
        done = cli('--laion', '--data-root', root, '--download-dir', run_url, '--storage-options', bad, env=env)
        assert done.returncode == 2 and says in done.stderr
    done = cli('--laion', '--data-root', root, '--download-dir', out, '--storage-options', '{"anon": true}', env=env)
    assert done.returncode == 2 and 'are for a download_dir URL' in done.stderr and done.stderr.count('\n') == 1
    done = cli('--laion', '--data-root', root, '--download-dir', f's3:/{run_url[5:]}', env=env)  # a slash missing: never a local folder
    assert done.returncode == 2 and f'did you mean {run_url}?' in done.stderr and done.stderr.count('\n') == 1
    assert not (Path.cwd()/'s3:').exists()


def test_local_webdataset_download(dump, tmp_path):
    "WebDataset shards in a local folder: tar:// URLs of local tars that tarfile opens, and the shard list; a stale list removed."
    root, out = dump
    wds_dir = tmp_path/'wds'
    s = open_store(wds_dir)
    write_shards(s, out)
    with pytest.raises(MakeIndexError, match='not finalized'): makeindex(cfg(root, wds_dir))
    finalize(s)
    rep = makeindex(cfg(root, wds_dir, with_index=True, val_ratio=0.3)).laion
    images = {o['index']: o['image'] for o in objs(root/'laion_train.jsonl') + objs(root/'laion_val.jsonl') if 'image' in o}
    assert images == {i: f'tar://{i}.jpg::{wds_dir}/{TARS_DIR}/{shard_of(i)}.tar' for i in SAVED}
    for i, image in images.items():
        member, tar_path = image[len('tar://'):].split('::')
        with tarfile.open(tar_path) as tar: assert tar.extractfile(member).read() == (out/'images'/f'{i}.jpg').read_bytes()
    shards = json.loads((root/'laion_train_shards.json').read_text(encoding='utf-8'))
    assert shards['pattern'] == f'{wds_dir}/{TARS_DIR}/{{00000..00001}}.tar' and shards['samples'] == 10
    assert any('laion_val.jsonl are in the shards too' in n for n in rep.notes)
    rep = makeindex(cfg(root, out)).laion  # the files download again: its index has no shard list
    assert not (root/'laion_train_shards.json').exists() and any(n.startswith('removed') and 'shards' in n for n in rep.notes)
