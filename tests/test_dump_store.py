"""The input dump on an object store: moto's S3 server on 127.0.0.1 reached through s3fs, as a user reaches S3 or MinIO.

A demo dump (two metadata shards in `metadate/`, with `img_emb/` and `text_emb/`) is put in the bucket; read from
there it must give what the same dump gives on local disk: rows, columns, embeddings, and a download's records.
"""
import json, os, shutil, subprocess, sys, uuid
from pathlib import Path

import pandas as pd
import pytest

from laion_nb import records
from laion_nb.download import DownloadConfig, download
from laion_nb.errors import MissingExtra
from laion_nb.metadata import Dump, DumpError
from laion_nb.store import BadLocation

from _s3 import s3_fixtures

BUCKET = 'laion-nb-dumps'
QUICK = dict(timeout=2, retries=0, allow_private_networks=True)


s3 = s3_fixtures(BUCKET)[0]


@pytest.fixture
def dumps(s3, demo_dump):
    "The same demo dump on local disk and in the bucket: (local root, its URL)."
    local = demo_dump(n=40, shard_rows=20, fail_share=0.2, seed=5, hanging=False)
    url = f's3://{BUCKET}/dump-{uuid.uuid4().hex[:8]}'
    import s3fs
    s3fs.S3FileSystem(skip_instance_cache=True).put(str(local), url, recursive=True)
    return local, url


def cfg_for(dump, out, **kw): return DownloadConfig.build(metadata=dump, output_dir=out, **{**QUICK, **kw})


def run_records(out:Path):
    "A local run's saved records by index (path aside) and its failures as (type, status) by index."
    saved = {}
    for line in (out/records.SAVED_FILE).read_text(encoding='utf-8').splitlines():
        r = json.loads(line); r.pop('path'); saved[r['index']] = r
    errors = json.loads((out/records.ERRORS_FILE).read_text(encoding='utf-8'))['errors']
    return saved, {e['index']: (e['error_type'], e['status']) for e in errors}


def cli():
    "The console script, as a user runs it (the module when the script is not on PATH)."
    exe = shutil.which('download_laion_images')
    return [exe] if exe else [sys.executable, '-m', 'laion_nb.download']


@pytest.mark.parametrize('where', ['', '/metadate', '/metadate/metadata_001.parquet'])
def test_a_dump_on_s3_reads_as_on_disk(dumps, where):
    "The dump root, its metadata folder, or one shard, in the bucket: the same rows, columns, shards and embeddings as on disk."
    local, url = dumps
    a, b = Dump(url + where), Dump(str(local) + where)
    assert (len(a), a.shard_rows, a.columns, a.url_col, a.caption_col) == (len(b), b.shard_rows, b.columns, b.url_col, b.caption_col)
    assert [s.name for s in a.shards] == [s.name for s in b.shards] and len(a.shards) == (1 if where.endswith('.parquet') else 2)
    assert str(a.root) == url and repr(a).startswith(f"Dump('{url}'")
    pd.testing.assert_frame_equal(pd.concat(a.batches(columns=a.columns + ['index'], batch_size=7), ignore_index=True),
                                  pd.concat(b.batches(columns=b.columns + ['index'], batch_size=7), ignore_index=True))
    assert list(a.rows(start=15, limit=10)) == list(b.rows(start=15, limit=10))  # across the shard boundary
    pd.testing.assert_frame_equal(a.check_embeddings(), b.check_embeddings())
    rows = [len(a) - 1, 0, len(a) // 2, 3]
    for kind in ('img', 'text'): assert (a.embedding_rows(rows, kind) == b.embedding_rows(rows, kind)).all()
    assert not any(p.name.startswith('s3') for p in Path.cwd().iterdir()), 'no local folder named s3:'


@pytest.fixture
def endpoint_only_in_options(s3, monkeypatch):
    "The S3 endpoint taken out of the environment (and out of s3fs's cached filesystems): only `storage_options` can name it."
    import s3fs
    endpoint = os.environ['AWS_ENDPOINT_URL']
    monkeypatch.delenv('AWS_ENDPOINT_URL')
    s3fs.S3FileSystem.clear_instance_cache()
    yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()


def test_storage_options_reach_the_dump(dumps, endpoint_only_in_options):
    "With no endpoint in the environment, the dump is reached through the endpoint `storage_options` give."
    local, url = dumps
    endpoint = endpoint_only_in_options
    with pytest.raises(Exception): Dump(url, storage_options={'endpoint_url': 'http://127.0.0.1:9', 'connect_timeout': 1,
                                                             'config_kwargs': {'retries': {'max_attempts': 1}}})
    assert len(Dump(url, storage_options={'endpoint_url': endpoint})) == len(Dump(local))


def test_a_download_from_a_dump_on_s3_matches_one_from_disk(dumps, tmp_path):
    "download() with `metadata='s3://...'` and a local output: the same records as with the local dump."
    local, url = dumps
    a = download(cfg_for(url, tmp_path/'from-s3', processes=1), progress=None)
    b = download(cfg_for(local, tmp_path/'from-disk', processes=1), progress=None)
    assert (a.attempted, a.saved, a.failed, a.by_type) == (b.attempted, b.saved, b.failed, b.by_type) == (40, a.saved, a.failed, a.by_type)
    assert a.saved >= 20 and a.failed >= 1
    assert run_records(tmp_path/'from-s3') == run_records(tmp_path/'from-disk')


def test_a_download_from_s3_to_s3_with_storage_options(dumps, tmp_path, endpoint_only_in_options):
    "A run whose dump and output are both in the bucket, the endpoint only in `storage_options`: one set of options serves both."
    local, url = dumps
    endpoint = endpoint_only_in_options
    rep = download(cfg_for(url + '/metadate/metadata_000.parquet', f's3://{BUCKET}/run-{uuid.uuid4().hex[:8]}', processes=1,
                           storage_options={'endpoint_url': endpoint}), progress=None)
    assert rep.attempted == 20


@pytest.mark.parametrize('output_format', ['files', 'webdataset'])
def test_a_dump_on_s3_with_storage_options_to_a_local_output(dumps, tmp_path, endpoint_only_in_options, output_format):
    "The endpoint only in `storage_options`, the output a local folder: the options are the dump's, and the output opens as a folder."
    local, url = dumps
    endpoint = endpoint_only_in_options
    rep = download(cfg_for(url + '/metadate/metadata_000.parquet', tmp_path/'out', processes=1, output_format=output_format,
                           storage_options={'endpoint_url': endpoint}), progress=None)
    assert rep.attempted == 20 and rep.saved >= 10
    assert (tmp_path/'out'/'image_paths.jsonl').exists() and not (tmp_path/'s3:').exists()


def test_the_cli_reads_a_dump_on_s3(dumps, tmp_path):
    "`download_laion_images --metadata s3://bucket/dump/metadate/metadata_000.parquet --output-dir local/`."
    local, url = dumps
    r = subprocess.run([*cli(), '--metadata', f'{url}/metadate/metadata_000.parquet', '--output-dir', str(tmp_path/'out'),
                        '--timeout', '2', '--retry', '0', '--allow-private-networks', '--processes', '1', '--quiet'],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    saved, failed = run_records(tmp_path/'out')
    assert sorted([*saved, *failed]) == list(range(20))  # every row of the first shard, and only those
    assert sorted(p.name for p in tmp_path.iterdir()) == ['dump', 'out'], 'no local folder named s3:'


def test_errors_are_one_line_naming_the_location(s3, tmp_path):
    "A missing dump, a missing bucket, a slash missing, a backend not installed: one line that names the location."
    with pytest.raises(DumpError, match=f'^s3://{BUCKET}/nope: no such file or directory$'): Dump(f's3://{BUCKET}/nope')
    with pytest.raises(DumpError) as e: Dump('s3://no-such-bucket-here/dump')
    assert str(e.value).startswith('s3://no-such-bucket-here/dump') and '\n' not in str(e.value)
    with pytest.raises(BadLocation, match='did you mean s3://b/dump'): Dump('s3:/b/dump')
    try: import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(MissingExtra, match=r"^gs://b/dump: .*pip install 'laion_nb\[gcs\]'$"): Dump('gs://b/dump')
    for bad in (f's3://{BUCKET}/nope', 's3:/b/dump'):
        r = subprocess.run([*cli(), '--metadata', bad, '--output-dir', str(tmp_path/'out'), '--quiet'],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and (bad in last or 'did you mean s3://b/dump' in last), r.stderr
    assert not any(p.name.startswith('s3') for p in tmp_path.iterdir()), 'no local folder named s3:'


def test_streaming_two_columns_fetches_those_columns_not_the_file(s3, tmp_path, monkeypatch):
    "A shard with a large column not asked for: streaming url and caption fetches a small part of the file, not all of it."
    import numpy as np, pyarrow as pa, pyarrow.parquet as pq, s3fs
    n = 20_000
    (tmp_path/'metadate').mkdir()
    pq.write_table(pa.table({'url': [f'http://x.example/{i}.jpg' for i in range(n)], 'caption': ['a cat'] * n,
                             'blob': [np.random.default_rng(i).bytes(200) for i in range(n)]}),
                   tmp_path/'metadate'/'metadata_000.parquet', row_group_size=5_000)
    url = f's3://{BUCKET}/wide-{uuid.uuid4().hex[:8]}'
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(str(tmp_path/'metadate'), f'{url}/metadate', recursive=True)
    size = fs.size(f'{url}/metadate/metadata_000.parquet')
    fetched = []
    real = s3fs.core.S3File._fetch_range
    monkeypatch.setattr(s3fs.core.S3File, '_fetch_range', lambda self, start, end: fetched.append(end - start) or real(self, start, end))
    dump = Dump(url)
    assert sum(len(b) for b in dump.batches(columns=('url', 'caption'), batch_size=3_000)) == n
    assert 0 < sum(fetched) < size / 4, (sum(fetched), size)  # the blob column is most of the file and is never read
