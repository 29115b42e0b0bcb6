"Reading dumps: layouts, ordering, streaming windows and the errors users meet, on real parquet and .npy files."
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_nb.metadata import Dump, DumpError, Row


def write_shards(folder, sizes, url='url', caption='caption', row_group_size=None, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for k, n in enumerate(sizes):
        ids = range(start, start + n)
        name = names[k] if names else f'metadata_{k:03d}.parquet'
        pq.write_table(pa.table({url: [f'http://h{i % 7}.test/{i}.jpg' for i in ids], caption: [f'cap {i}' for i in ids],
                                 'key': [f'{i:09d}' for i in ids]}), folder/name, row_group_size=row_group_size)
        start += n


def test_shards_in_numeric_order(tmp_path):
    names = [f'metadata_{k}.parquet' for k in (0, 1, 2, 10, 11, 3)]
    write_shards(tmp_path/'metadata', [1] * 6, names=names)
    dump = Dump(tmp_path)
    assert [s.name for s in dump.shards] == [f'metadata_{k}.parquet' for k in (0, 1, 2, 3, 10, 11)]
    # index follows shard order: shard metadata_3 (written 6th) holds row index 3
    keys = pd.concat(dump.batches(columns=('index', 'key')))
    assert keys['key'].tolist() == ['000000000', '000000001', '000000002', '000000005', '000000003', '000000004']


@pytest.mark.parametrize('url,caption', [('URL', 'TEXT'), ('image_url', 'text'), ('link', 'title')])
def test_column_aliases(tmp_path, url, caption):
    write_shards(tmp_path, [3], url=url, caption=caption)
    dump = Dump(tmp_path)
    assert (dump.url_col, dump.caption_col) == (url, caption)
    assert list(dump.rows()) == [Row(i, f'http://h{i}.test/{i}.jpg', f'cap {i}') for i in range(3)]


def test_explicit_columns_and_passthrough(tmp_path):
    write_shards(tmp_path, [2])
    dump = Dump(tmp_path, url_col='key', caption_col='url')
    assert next(dump.rows()).url == '000000000'
    frame = next(Dump(tmp_path).batches(columns=('index', 'url', 'key')))
    assert frame.columns.tolist() == ['index', 'url', 'key']


def test_windows_match_a_full_read(tmp_path):
    write_shards(tmp_path, [1000, 1, 2500, 700], row_group_size=128)
    dump = Dump(tmp_path)
    full = pd.concat([pq.read_table(s).to_pandas() for s in dump.shards], ignore_index=True)
    for start, limit, bs in [(0, None, 333), (999, 3, 1), (1001, 2600, 1000), (4100, 1000, 64), (4200, 5, 7)]:
        got = pd.concat(dump.batches(start=start, limit=limit, batch_size=bs), ignore_index=True)
        stop = len(full) if limit is None else min(len(full), start + limit)
        assert got['index'].tolist() == list(range(start, stop))
        assert got['url'].tolist() == full['url'][start:stop].tolist()


def test_shard_missing_a_column_is_named(tmp_path):
    write_shards(tmp_path, [2])
    pq.write_table(pa.table({'url': ['u'], 'TEXT': ['t']}), tmp_path/'metadata_001.parquet')
    with pytest.raises(DumpError, match=r"metadata_001.parquet: no column 'caption'"):
        Dump(tmp_path)


def test_errors_name_the_path(tmp_path):
    with pytest.raises(DumpError, match='no such file'): Dump(tmp_path/'missing')
    (tmp_path/'empty').mkdir()
    with pytest.raises(DumpError, match='empty: no .parquet'): Dump(tmp_path/'empty')
    (tmp_path/'junk.parquet').write_bytes(b'PAR1 but not really')
    with pytest.raises(DumpError, match='junk.parquet: not a readable parquet file'): Dump(tmp_path/'junk.parquet')
    write_shards(tmp_path/'ok', [2])
    with pytest.raises(ValueError, match='>= 0'): next(Dump(tmp_path/'ok').batches(start=-1))


def test_embeddings_line_up_and_rows_come_back(tmp_path):
    write_shards(tmp_path/'metadate', [3, 2])
    for kind in ('img', 'text'):
        (tmp_path/f'{kind}_emb').mkdir()
        for k, n in enumerate([3, 2]):
            base = 0 if k == 0 else 3
            np.save(tmp_path/f'{kind}_emb'/f'{kind}_emb_{k:03d}.npy', (np.arange(base, base + n)[:, None] * np.ones((1, 4))).astype(np.float16))
    dump = Dump(tmp_path)
    assert dump.check_embeddings()['text_dim'].tolist() == [4, 4]
    assert dump.embedding_rows([4, 0, 3], 'img')[:, 0].tolist() == [4, 0, 3]
    assert isinstance(dump.embeddings('img')[0], np.memmap)
    (tmp_path/'text_emb'/'text_emb_001.npy').write_bytes(b'not numpy')
    with pytest.raises(DumpError, match='text_emb_001.npy: not a readable .npy'):
        dump.embeddings('text')


def test_loose_shards_have_no_embeddings(tmp_path):
    write_shards(tmp_path/'shards', [2])
    with pytest.raises(DumpError, match='not inside a dump root'):
        Dump(tmp_path/'shards').embeddings()
