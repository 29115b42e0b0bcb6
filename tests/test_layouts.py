"""The dumps people actually have, end to end: each real release's layout, tiny, served by the demo server,
opened with `Dump`, downloaded and indexed. `tests/test_metadata.py` checks the reader's details; this checks
that the whole job works on each layout, as a user meets it."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_nb import demo
from laion_nb.download import DownloadConfig, download
from laion_nb.makeindex import IndexConfig, LaionIndex, makeindex
from laion_nb.metadata import Dump

GOOD, BAD = 9, 3  # per layout: rows with a picture, rows whose URL answers 404


def urls(server, n):
    return [server.url(f'img/{i}.jpg') if i % 4 else server.url(f'status/404?i={i}') for i in range(n)]


def write_shards(folder:Path, names, columns, rows, url_col, text_col, make_url):
    "Metadata shards named `names` in `folder`, `rows` rows each, URLs and captions under the release's column names."
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for name, n in zip(names, rows):
        idx = list(range(start, start + n))
        data = {c: [f'{c}-{i}' for i in idx] for c in columns}
        data[url_col], data[text_col] = [make_url(i) for i in idx], [f'a picture, number {i}' for i in idx]
        pq.write_table(pa.table(data), folder/name)
        start += n
    return start


def write_embeddings(img_dir:Path, txt_dir:Path, names, rows, dim, dtype):
    img_dir.mkdir(parents=True, exist_ok=True); txt_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    for (img_name, txt_name), n in zip(names, rows):
        rows_ = np.arange(start, start + n, dtype=np.float32)[:, None] * np.ones((1, dim), np.float32)
        np.save(img_dir/img_name, rows_.astype(dtype)); np.save(txt_dir/txt_name, -rows_.astype(dtype))
        start += n


CLIP = ['image_path', 'caption', 'NSFW', 'similarity', 'LICENSE', 'url', 'key', 'status', 'error_message', 'exif', 'md5']


def clip_retrieval(root, make_url):
    "Hugging Face / clip-retrieval: metadata/metadata_0000.parquet beside img_emb/ and text_emb/, float16, uneven shards."
    rows = [5, 7]
    write_shards(root/'metadata', [f'metadata_{k:04d}.parquet' for k in range(2)], CLIP, rows, 'url', 'caption', make_url)
    write_embeddings(root/'img_emb', root/'text_emb', [(f'img_emb_{k:04d}.npy', f'text_emb_{k:04d}.npy') for k in range(2)],
                     rows, 64, np.float16)
    return root, root


def the_eye_5b(root, make_url):
    "the-eye LAION-5B: laion2B-en/laion2B-en-metadata/metadata_0000.parquet beside laion2B-en/img_emb/ and text_emb/."
    dump = root/'laion2B-en'
    rows = [6, 6]
    write_shards(dump/'laion2B-en-metadata', [f'metadata_{k:04d}.parquet' for k in range(2)], CLIP, rows, 'url', 'caption', make_url)
    write_embeddings(dump/'img_emb', dump/'text_emb', [(f'img_emb_{k:04d}.npy', f'text_emb_{k:04d}.npy') for k in range(2)],
                     rows, 64, np.float16)
    return dump, dump/'laion2B-en-metadata'


def laion_400m(root, make_url):
    "LAION-400M embeddings: images/img_emb_{i}.npy, texts/text_emb_{i}.npy, metadata/metadata_{i}.parquet, unpadded, 512-d."
    rows = [1] * 10 + [2]  # 11 shards: shard 10 must come after shard 2
    write_shards(root/'metadata', [f'metadata_{k}.parquet' for k in range(11)], CLIP, rows, 'url', 'caption', make_url)
    write_embeddings(root/'images', root/'texts', [(f'img_emb_{k}.npy', f'text_emb_{k}.npy') for k in range(11)], rows, 512, np.float16)
    return root, root


def spark_metadata_only(root, make_url):
    "Metadata-only Spark output: part-0000X-<uuid>-c000.snappy.parquet, upper-case columns, with macOS and Spark strays."
    folder = root/'laion2B-en-joined'
    cols = ['SAMPLE_ID', 'URL', 'TEXT', 'WIDTH', 'HEIGHT', 'punsafe', 'pwatermark']
    names = [f'part-{k:05d}-5114fd87-297e-42b0-9d11-50f1df323dfa-c000.snappy.parquet' for k in range(2)]
    write_shards(folder, names, cols, [6, 6], 'URL', 'TEXT', make_url)
    (folder/'_SUCCESS').write_bytes(b'')
    (folder/f'._{names[0]}').write_bytes(b'\x00\x05\x16\x07 macOS resource fork, not parquet')
    return folder, folder


LAYOUTS = [clip_retrieval, the_eye_5b, laion_400m, spark_metadata_only]


@pytest.fixture(scope='module')
def server():
    with demo.ImageServer() as s: yield s


@pytest.mark.parametrize('layout', LAYOUTS, ids=lambda f: f.__name__)
def test_each_release_layout_opens_downloads_and_indexes(layout, server, tmp_path):
    n = GOOD + BAD
    make_url = lambda i: urls(server, n)[i]
    dump_root, other_way_in = layout(tmp_path/'data', make_url)
    for path in (dump_root, other_way_in):  # the dump root, or its metadata folder
        dump = Dump(path)
        assert len(dump) == n, (path, dump.summary())
        rows = [r for b in dump.batches(('index', 'url', 'caption')) for r in zip(b['index'].tolist(), b['url'].tolist())]
        assert rows == [(i, make_url(i)) for i in range(n)]  # global row order, shards in numeric order

    out = tmp_path/'out'
    rep = download(DownloadConfig.build(metadata=dump_root, output_dir=out, timeout=2, retries=0, allow_private_networks=True), progress=None)
    assert (rep.saved, rep.failed) == (GOOD, BAD), rep
    assert sorted(int(p.stem) for p in (out/'images').glob('*.jpg')) == [i for i in range(n) if i % 4]

    idx = makeindex(IndexConfig(data_root=tmp_path/'data', esc50=None, laion=LaionIndex(dir=dump_root, download_dir=out)))
    lines = [json.loads(l) for l in (tmp_path/'data'/'laion_train.jsonl').read_text(encoding='utf-8').splitlines()]
    local = [l for l in lines if 'image' in l]
    assert len(local) == GOOD, idx
    assert all(Path(l['image']).is_file() and l['text'].startswith('a picture') for l in local)
    assert {Path(l['image']).stem for l in local} == {str(i) for i in range(n) if i % 4}


@pytest.mark.parametrize('layout', [clip_retrieval, the_eye_5b, laion_400m], ids=lambda f: f.__name__)
def test_embeddings_line_up_with_rows(layout, server, tmp_path):
    "Row i of the metadata is row i of img_emb and text_emb, however the release names and pads its shards."
    for way_in in layout(tmp_path, lambda i: server.url(f'img/{i}.jpg')):
        dump = Dump(way_in)
        rows = [0, 4, len(dump) - 1]
        assert dump.embedding_rows(rows, 'img')[:, 0].astype(np.float32).tolist() == rows, way_in
        assert dump.embedding_rows(rows, 'text')[:, 0].astype(np.float32).tolist() == [-r for r in rows], way_in
