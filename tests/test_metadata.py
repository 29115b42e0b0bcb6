"Reading dumps: the layouts of the real releases, ordering, streaming windows, embeddings and the errors users meet, on real parquet and .npy files."
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_nb.metadata import Dump, DumpError, Row

UUID = '5b54c5d5-bbcf-484d-a2ce-0d6f73df1a36'
# name: (metadata shard path, (image, text) embedding paths or None, URL and caption columns), as each release names them
LAYOUTS = {
    'guide': ('metadate/metadata_{k:03d}.parquet', ('img_emb/img_emb_{k:03d}.npy', 'text_emb/text_emb_{k:03d}.npy'), ('url', 'caption')),
    'clip-retrieval': ('metadata/metadata_{k:04d}.parquet', ('img_emb/img_emb_{k:04d}.npy', 'text_emb/text_emb_{k:04d}.npy'), ('url', 'caption')),
    'the-eye': ('laion2B-en-metadata/metadata_{k:04d}.parquet', ('img_emb/img_emb_{k:04d}.npy', 'text_emb/text_emb_{k:04d}.npy'), ('url', 'caption')),
    'laion400m': ('metadata/metadata_{k}.parquet', ('images/img_emb_{k}.npy', 'texts/text_emb_{k}.npy'), ('url', 'caption')),
    'spark': (f'part-{{k:05d}}-{UUID}-c000.snappy.parquet', None, ('URL', 'TEXT')),
    'loose': ('metadata_{k:03d}.parquet', None, ('url', 'caption')),
}


def url(i): return f'http://h{i % 7}.test/{i}.jpg'


def build(root, layout='guide', sizes=(3, 1, 4), dim=8, dims=None, cols=None, urls=None, row_group_size=None):
    """Write a tiny dump in `layout` under `root`: row i has `url(i)`, caption `cap i`, image vector all i, text vector all -i.
    `dims` overrides `dim` by shard, `cols` the (URL, caption) names, `urls` the URL column of each shard (a pyarrow array)."""
    meta, emb, (ucol, ccol) = LAYOUTS[layout]
    ucol, ccol = cols or (ucol, ccol)
    sizes = [len(u) for u in urls] if urls else sizes
    start = 0
    for k, n in enumerate(sizes):
        ids = list(range(start, start + n))
        table = {ucol: urls[k] if urls else [url(i) for i in ids], ccol: [f'cap {i}' for i in ids]}
        if layout == 'spark': table.update(SAMPLE_ID=ids, WIDTH=[640] * n, HEIGHT=[480] * n, punsafe=[0.1] * n, pwatermark=[0.2] * n)
        else: table['key'] = [f'{i:09d}' for i in ids]
        (root/meta.format(k=k)).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(table), root/meta.format(k=k), row_group_size=row_group_size)
        for sign, path in zip((1, -1), emb or ()):
            (root/path.format(k=k)).parent.mkdir(parents=True, exist_ok=True)
            d = (dims or {}).get(k, dim)
            np.save(root/path.format(k=k), (sign * np.array(ids, np.float16)[:, None] * np.ones((1, d), np.float16)))
        start += n
    return root


def meta_dir(root, layout): return (root/LAYOUTS[layout][0]).parent


def check_dump(dump, n, embeddings=True):
    "Every row in order with its URL and caption, and (when the dump has them) embeddings aligned by index."
    rows = list(dump.rows(batch_size=2))
    assert rows == [Row(i, url(i), f'cap {i}') for i in range(n)]
    frame = pd.concat(dump.batches(batch_size=3), ignore_index=True)
    assert frame['index'].tolist() == list(range(n)) and frame['url'].tolist() == [url(i) for i in range(n)]
    if embeddings:
        order = np.random.default_rng(0).permutation(n)
        assert dump.embedding_rows(order, 'img')[:, 0].tolist() == order.tolist()
        assert dump.embedding_rows(order, 'text')[:, 0].tolist() == (-order).tolist()


@pytest.mark.parametrize('layout', ['guide', 'clip-retrieval', 'the-eye', 'laion400m'])
@pytest.mark.parametrize('at', ['root', 'metadata folder', 'one shard'])
def test_release_layouts_open_stream_and_align(tmp_path, layout, at):
    root = build(tmp_path/'dump', layout, sizes=(3, 1, 5, 2))
    dump = Dump({'root': root, 'metadata folder': meta_dir(root, layout),
                 'one shard': meta_dir(root, layout)/LAYOUTS[layout][0].split('/')[1].format(k=0)}[at])
    assert dump.root == root and dump.skipped == []
    if at == 'one shard':
        assert len(dump) == 3 and dump.embedding_rows([2, 0])[:, 0].tolist() == [2, 0]
        return
    check_dump(dump, 11)
    table = dump.check_embeddings()
    assert table['rows'].tolist() == [3, 1, 5, 2] and set(table['img_dtype']) == {'float16'}
    assert dump.summary()['value']['img embeddings'] == '8-d float16'


def test_laion400m_unpadded_shards_sort_numerically_beside_downloads(tmp_path):
    sizes = [1, 2, 1, 3, 1, 1, 2, 1, 1, 1, 2, 3]  # 12 shards: metadata_10 and _11 sort after _9, not after _1
    root = build(tmp_path, 'laion400m', sizes=sizes, dim=512)
    (root/'images'/'0.jpg').write_bytes(b'\xff\xd8 a downloaded picture')  # images/ is also the download folder
    (root/'images'/'1.jpg').write_bytes(b'\xff\xd8 another')
    dump = Dump(root)
    assert [s.name for s in dump.shards] == [f'metadata_{k}.parquet' for k in range(12)]
    assert [p.name for p in dump.embedding_files('text')][9:] == ['text_emb_9.npy', 'text_emb_10.npy', 'text_emb_11.npy']
    check_dump(dump, sum(sizes))
    assert dump.check_embeddings()['img_dim'].unique().tolist() == [512]


def test_embeddings_matched_by_number_however_padded(tmp_path):
    build(tmp_path, 'laion400m', sizes=(2, 3))
    for kind, folder in (('img', 'images'), ('text', 'texts')):
        for k in range(2): (tmp_path/folder/f'{kind}_emb_{k}.npy').rename(tmp_path/folder/f'{kind}_emb_{k:04d}.npy')
    check_dump(Dump(tmp_path), 5)


def test_images_folder_of_pictures_only_is_not_embeddings(tmp_path):
    build(tmp_path, 'clip-retrieval', sizes=(2,))
    for d in ('img_emb', 'text_emb'):
        for p in (tmp_path/d).iterdir(): p.unlink()
        (tmp_path/d).rmdir()
    (tmp_path/'images').mkdir()
    (tmp_path/'images'/'0.jpg').write_bytes(b'\xff\xd8 a downloaded picture')
    dump = Dump(tmp_path)
    check_dump(dump, 2, embeddings=False)
    with pytest.raises(DumpError, match=r'no img embeddings \(looked for img_emb/img_emb_N.npy and images/img_emb_N.npy\)'):
        dump.embedding_rows([0])
    assert dump.summary()['value']['text embeddings'].startswith('not usable: ')


def test_spark_metadata_only_release_skips_stray_files(tmp_path):
    build(tmp_path, 'spark', sizes=(2, 3, 1))
    (tmp_path/'_SUCCESS').touch()
    for k in range(3): (tmp_path/f'.part-{k:05d}-{UUID}-c000.snappy.parquet.crc').write_bytes(b'crc')
    (tmp_path/f'._part-00000-{UUID}-c000.snappy.parquet').write_bytes(b'\x00\x05\x16\x07Mac OS X')  # not parquet: reading it fails
    dump = Dump(tmp_path)
    assert (dump.root, dump.url_col, dump.caption_col, len(dump.shards)) == (None, 'URL', 'TEXT', 3)
    check_dump(dump, 6, embeddings=False)
    assert next(dump.batches(columns=('index', 'SAMPLE_ID', 'punsafe')))['SAMPLE_ID'].tolist() == [0, 1]
    assert {p.name: why for p, why in dump.skipped} == {
        f'._part-00000-{UUID}-c000.snappy.parquet': 'macOS resource file', '_SUCCESS': 'Spark/Hadoop marker file',
        **{f'.part-{k:05d}-{UUID}-c000.snappy.parquet.crc': 'checksum file' for k in range(3)}}
    s = dump.summary()['value']
    assert s['skipped files'].startswith(f'5: ._part-00000-{UUID}-c000.snappy.parquet (macOS resource file), .part-00000')
    assert '5 other file(s) skipped' in repr(dump)
    with pytest.raises(DumpError, match='not inside a dump root.*point Dump at the dump root'):
        dump.embeddings()


def test_a_folder_of_stray_files_only_says_what_it_saw(tmp_path):
    (tmp_path/'metadata').mkdir()
    (tmp_path/'metadata'/'._metadata_0.parquet').write_bytes(b'\x00\x05\x16\x07')
    with pytest.raises(DumpError, match=r'metadata: no .parquet metadata shards in this directory \(it holds ._metadata_0.parquet\); '
                                        r'point Dump at the dump root, its metadata folder'):
        Dump(tmp_path)


def test_error_messages_say_what_to_point_at(tmp_path):
    root = build(tmp_path/'laion2B-en', 'the-eye', sizes=(2,))
    with pytest.raises(DumpError, match=r'img_emb: no .parquet metadata shards in this directory \(it holds img_emb_0000.npy\), '
                                        r'and no metadata folder \(metadate/, metadata/ or <name>-metadata/\) in it; '
                                        rf'point Dump at the dump root \({root} is one\)'):
        Dump(root/'img_emb')
    build(tmp_path/'two', 'the-eye', sizes=(1,))
    (tmp_path/'two'/'laion2B-multi-metadata').mkdir()
    with pytest.raises(DumpError, match=r'2 metadata folders \(laion2B-en-metadata, laion2B-multi-metadata\); point Dump at one'):
        Dump(tmp_path/'two')
    assert Dump(tmp_path/'two'/'laion2B-en-metadata').root == tmp_path/'two'


def test_mixed_dimensions_named_in_summary_and_errors(tmp_path):
    dump = Dump(build(tmp_path, 'clip-retrieval', sizes=(2, 2, 3), dims={2: 16}))
    s = dump.summary()['value']
    assert s['img embeddings'] == ('mixed: 8-d float16 in 2 shard(s) (img_emb_0000.npy, img_emb_0001.npy); '
                                   '16-d float16 in 1 shard(s) (img_emb_0002.npy)')
    msg = r'img_emb_0002.npy: 16-d img embeddings, but img_emb_0000.npy has 8-d ones'
    with pytest.raises(DumpError, match=msg): dump.embedding_rows([0, 5])
    with pytest.raises(DumpError, match=msg): dump.check_embeddings()
    assert [a.shape[1] for a in dump.embeddings('img')] == [8, 8, 16]


@pytest.mark.parametrize('arr,values', [
    (pa.array(['http://a.test/0.jpg', None, 'http://a.test/2.jpg']), ['http://a.test/0.jpg', None, 'http://a.test/2.jpg']),
    (pa.array([7, None, 9], pa.int64()), [7, None, 9]),
    (pa.array([b'http://a.test/0.jpg', None, b'\xff']), [b'http://a.test/0.jpg', None, b'\xff']),
    (pa.array([['http://a.test/0.jpg'], None, []]), [['http://a.test/0.jpg'], None, []]),
    (pa.array([None, None, None], pa.null()), [None, None, None]),
    (pa.array(['http://a.test/0.jpg', None, 'x']).dictionary_encode(), ['http://a.test/0.jpg', None, 'x']),
])
def test_url_columns_of_any_type_stream_every_row(tmp_path, arr, values):
    dump = Dump(build(tmp_path, 'loose', urls=[arr, pa.array(['http://b.test/3.jpg'])]))
    got = pd.concat(dump.batches(batch_size=2), ignore_index=True)
    assert got['index'].tolist() == [0, 1, 2, 3]
    assert got['url'].tolist() == values + ['http://b.test/3.jpg'] and got['url'].dtype == object
    assert [r.url for r in dump.rows()] == values + ['http://b.test/3.jpg']
    s = dump.summary()['value']
    assert s['missing urls'] == sum(v is None for v in values)
    text = isinstance(values[0], str) or values[0] is None
    assert s.get('non-text urls', 0) == (0 if text else 2)


def test_null_captions_are_none_not_nan(tmp_path):
    pq.write_table(pa.table({'url': ['http://a.test/0.jpg', None], 'caption': [None, 'cap']}), tmp_path/'metadata_000.parquet')
    frame = next(Dump(tmp_path).batches())
    assert frame['url'].tolist() == ['http://a.test/0.jpg', None] and frame['caption'].tolist() == [None, 'cap']


@pytest.mark.parametrize('url,caption', [('URL', 'TEXT'), ('image_url', 'text'), ('link', 'title')])
def test_column_aliases(tmp_path, url, caption):
    dump = Dump(build(tmp_path, 'loose', sizes=(3,), cols=(url, caption)))
    assert (dump.url_col, dump.caption_col) == (url, caption)
    check_dump(dump, 3, embeddings=False)


def test_explicit_columns_and_passthrough(tmp_path):
    build(tmp_path, 'loose', sizes=(2,))
    dump = Dump(tmp_path, url_col='key', caption_col='url')
    assert next(dump.rows()).url == '000000000'
    frame = next(Dump(tmp_path).batches(columns=('index', 'url', 'key')))
    assert frame.columns.tolist() == ['index', 'url', 'key']


def test_windows_match_a_full_read(tmp_path):
    build(tmp_path, 'loose', sizes=(1000, 1, 2500, 700), row_group_size=128)
    dump = Dump(tmp_path)
    full = pd.concat([pq.read_table(s).to_pandas() for s in dump.shards], ignore_index=True)
    for start, limit, bs in [(0, None, 333), (999, 3, 1), (1001, 2600, 1000), (4100, 1000, 64), (4200, 5, 7)]:
        got = pd.concat(dump.batches(start=start, limit=limit, batch_size=bs), ignore_index=True)
        stop = len(full) if limit is None else min(len(full), start + limit)
        assert got['index'].tolist() == list(range(start, stop))
        assert got['url'].tolist() == full['url'][start:stop].tolist()


def test_shard_missing_a_column_is_named(tmp_path):
    build(tmp_path, 'loose', sizes=(2,))
    pq.write_table(pa.table({'url': ['u'], 'TEXT': ['t']}), tmp_path/'metadata_001.parquet')
    with pytest.raises(DumpError, match=r"metadata_001.parquet: no column 'caption'"):
        Dump(tmp_path)


def test_errors_name_the_path(tmp_path):
    with pytest.raises(DumpError, match='no such file'): Dump(tmp_path/'missing')
    (tmp_path/'empty').mkdir()
    with pytest.raises(DumpError, match='empty: no .parquet'): Dump(tmp_path/'empty')
    (tmp_path/'junk.parquet').write_bytes(b'PAR1 but not really')
    with pytest.raises(DumpError, match='junk.parquet: not a readable parquet file'): Dump(tmp_path/'junk.parquet')
    build(tmp_path/'ok', 'loose', sizes=(2,))
    with pytest.raises(ValueError, match='>= 0'): next(Dump(tmp_path/'ok').batches(start=-1))


def test_embedding_files_that_do_not_line_up(tmp_path):
    dump = Dump(build(tmp_path, 'guide', sizes=(3, 2)))
    assert isinstance(dump.embeddings('img')[0], np.memmap)
    np.save(tmp_path/'img_emb'/'img_emb_001.npy', np.zeros((3, 8), np.float16))
    with pytest.raises(DumpError, match='img_emb_001.npy: 3 rows of img embeddings but metadata_001.parquet has 2 rows'):
        dump.embedding_rows([0])
    (tmp_path/'text_emb'/'text_emb_001.npy').write_bytes(b'not numpy')
    with pytest.raises(DumpError, match='text_emb_001.npy: not a readable .npy'):
        dump.embeddings('text')
    (tmp_path/'text_emb'/'text_emb_001.npy').unlink()
    with pytest.raises(DumpError, match='text_emb_001.npy: missing; it should hold the text embeddings of metadata_001.parquet'):
        dump.embeddings('text')


def test_loose_shards_have_no_embeddings(tmp_path):
    build(tmp_path/'shards', 'loose', sizes=(2,))
    with pytest.raises(DumpError, match='not inside a dump root'):
        Dump(tmp_path/'shards').embeddings()
