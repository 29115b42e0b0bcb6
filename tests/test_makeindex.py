"makeindex on real files: parquet dumps, real JPEGs recorded with records.RecordLog, the demo's ESC-50 mini set with real WAVs."
import hashlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest
from PIL import Image

from laion_nb import demo
from laion_nb.download import DownloadConfig, download
from laion_nb.errors import LaionNbError
from laion_nb.io import jsonl_line
from laion_nb.makeindex import Esc50Index, IndexConfig, LaionIndex, MakeIndexError, load_index, main, makeindex
from laion_nb.makeindex import (_ESC50_COLUMNS as ESC50_COLUMNS, _UrlGuard as UrlGuard, _find_local_images as find_local_images,
                                _index_esc50 as index_esc50, _index_laion as index_laion, _url_refusal as url_refusal,
                                _val_mask as val_mask, _wav_problem as wav_problem)
from laion_nb.records import FAILED_LOG, SAVED_FILE, BadRecordError, Failed, RecordLog, Saved, read_failed

MAKEINDEX = Path(sys.executable).parent/'makeindex'


def caption(i):
    return ['a red cat', '一只猫 on a mat', 'café "noir"\nsecond line', 'a tree', 'a map'][i % 5] + f' #{i}'


def url(i):
    return f'https://img{i % 3}.example.com/{i}.jpg'


def write_dump(laion, n, shards=3, captions=None, urls=None, meta='metadate'):
    "A dump of `n` rows in `shards` parquet files; row i has caption(i) and url(i) unless given."
    captions = captions or {}
    urls = urls or {}
    (laion/meta).mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        ids = range(lo, hi)
        pq.write_table(pa.table({'url': pa.array([urls.get(i, url(i)) for i in ids], pa.string()),
                                 'caption': pa.array([captions.get(i, caption(i)) for i in ids], pa.string()),
                                 'similarity': pa.array([0.3] * len(ids), pa.float32())}),
                       laion/meta/f'metadata_{k:03d}.parquet')
    return laion


def save_images(out_dir, indices, n_caption=caption):
    "Real JPEGs for `indices` in out_dir/images, each recorded with RecordLog like the downloader does."
    (out_dir/'images').mkdir(parents=True, exist_ok=True)
    with RecordLog(out_dir) as log:
        for i in indices:
            path = out_dir/'images'/f'{i}.jpg'
            Image.new('RGB', (64 + i % 7, 64), (i * 37 % 256, 80, 200)).save(path, quality=85)
            data = path.read_bytes()
            log.saved(Saved(i, f'images/{i}.jpg', url(i), n_caption(i), 64 + i % 7, 64, len(data), hashlib.sha256(data).hexdigest()))


@pytest.fixture
def root(tmp_path):
    "A data root with a 30-row dump in 3 shards and 12 downloaded images."
    root = tmp_path/'data_formal_alin'
    save_images(write_dump(root/'laion-1m-vit-h-14', 30), range(0, 24, 2))
    return root


def lines(path):
    return Path(path).read_text(encoding='utf-8').splitlines(keepends=True)


def objs(path):
    return [json.loads(line) for line in lines(path)]


def laion_cfg(root, max_samples=None, **kw):
    return IndexConfig(data_root=root, esc50=None, laion=LaionIndex(**kw), max_samples=max_samples)


# ---------------------------------------------------------------- LAION

def test_guide_format_local_first_then_url(root):
    rep = index_laion(laion_cfg(root))
    images = (root/'laion-1m-vit-h-14'/'images').resolve()
    want = [{'text': caption(i), 'image': f'{images}/{i}.jpg'} if i < 24 and i % 2 == 0 else {'text': caption(i), 'image_url': url(i)}
            for i in range(30)]
    assert objs(root/'laion_train.jsonl') == want
    assert all(Path(o['image']).is_file() for o in want if 'image' in o)
    # every line is exactly what json.dumps(ensure_ascii=False) writes: guide's separators, non-ASCII as is
    assert lines(root/'laion_train.jsonl') == [json.dumps(o, ensure_ascii=False) + '\n' for o in want]
    assert '一只猫' in (root/'laion_train.jsonl').read_text(encoding='utf-8')
    assert (rep.rows, rep.local, rep.remote, rep.train_lines, rep.val, rep.gone) == (30, 12, 18, 30, None, 0)
    assert not (root/'laion_val.jsonl').exists()


def test_loads_with_pandas_and_arrow(root):
    index_laion(laion_cfg(root, with_index=True))
    df = pd.read_json(root/'laion_train.jsonl', lines=True)
    assert df['index'].tolist() == list(range(30)) and df['text'][2] == caption(2)
    table = pajson.read_json(root/'laion_train.jsonl')  # what the Hugging Face datasets json loader uses
    assert table.num_rows == 30 and set(table.column_names) == {'text', 'image', 'image_url', 'index'}


def test_only_local_and_with_index(root):
    rep = index_laion(laion_cfg(root, only_local=True, with_index=True))
    got = objs(root/'laion_train.jsonl')
    assert [o['index'] for o in got] == list(range(0, 24, 2))
    assert all(set(o) == {'text', 'image', 'index'} and o['image'].endswith(f'/{o["index"]}.jpg') for o in got)
    assert (rep.local, rep.remote, rep.not_local) == (12, 0, 18)
    assert list(objs(root/'laion_train.jsonl')[0]) == ['text', 'image', 'index']


def test_gone_image_falls_back_to_url_and_is_counted(root):
    images = root/'laion-1m-vit-h-14'/'images'
    (images/'4.jpg').unlink()
    (images/'6.jpg').unlink()
    (images/'25.jpg').write_bytes(b'not listed in image_paths.jsonl, so not used')
    rep = index_laion(laion_cfg(root, with_index=True))
    by_index = {o['index']: o for o in objs(root/'laion_train.jsonl')}
    assert by_index[4] == {'text': caption(4), 'image_url': url(4), 'index': 4}
    assert 'image_url' in by_index[6] and 'image_url' in by_index[25] and 'image' in by_index[8]
    assert (rep.gone, rep.local, rep.remote) == (2, 10, 20)
    rep = index_laion(laion_cfg(root, only_local=True))
    assert (rep.gone, rep.local, rep.not_local, rep.train_lines) == (2, 10, 20, 10)


def test_empty_caption_or_url_rows_are_skipped_and_counted(tmp_path):
    root = tmp_path/'data'
    laion = write_dump(root/'laion-1m-vit-h-14', 12, shards=2,
                       captions={1: '', 2: None, 3: '   ', 4: ''}, urls={5: '', 6: None, 7: ' ', 8: ''})
    save_images(laion, [4, 8])  # 4 has no caption: still skipped; 8 has no URL but a local image: kept
    rep = index_laion(laion_cfg(root, with_index=True))
    assert [o['index'] for o in objs(root/'laion_train.jsonl')] == [0, 8, 9, 10, 11]
    assert (rep.rows, rep.no_caption, rep.no_url, rep.local, rep.remote) == (12, 4, 3, 1, 4)
    assert rep.rows == rep.local + rep.remote + rep.no_caption + rep.no_url + rep.not_local
    assert 'without caption' in repr(rep) and '4' in repr(rep)


def test_val_split_is_by_index_and_stable_as_the_dump_grows(tmp_path):
    def split(n):
        root = tmp_path/f'd{n}'
        save_images(write_dump(root/'laion-1m-vit-h-14', n, shards=4), range(0, n, 3))
        rep = index_laion(laion_cfg(root, val_ratio=0.25, with_index=True))
        train = [o['index'] for o in objs(root/'laion_train.jsonl')]
        val = [o['index'] for o in objs(root/'laion_val.jsonl')]
        assert sorted(train + val) == list(range(n)) and not set(train) & set(val)
        assert (rep.train_lines, rep.val_lines) == (len(train), len(val))
        return set(val)
    small, big = split(200), split(1000)
    assert small == {i for i in big if i < 200}
    assert small == set(np.flatnonzero(val_mask(np.arange(200), 0.25)))
    assert 30 < len(small) < 70  # about a quarter


def test_val_split_with_only_local_keeps_rows_on_their_side(root):
    index_laion(laion_cfg(root, val_ratio=0.5, with_index=True))
    val_all = {o['index'] for o in objs(root/'laion_val.jsonl')}
    index_laion(laion_cfg(root, val_ratio=0.5, with_index=True, only_local=True))
    val_local = {o['index'] for o in objs(root/'laion_val.jsonl')}
    assert val_local == {i for i in val_all if i < 24 and i % 2 == 0}


def test_stale_val_file_is_removed_and_reported(root):
    index_laion(laion_cfg(root, val_ratio=0.3))
    assert (root/'laion_val.jsonl').exists()
    rep = index_laion(laion_cfg(root))
    assert not (root/'laion_val.jsonl').exists()
    assert any('laion_val.jsonl' in n for n in rep.notes) and 'removed' in repr(rep)
    assert rep.train_lines == 30


def test_max_samples_reads_the_first_rows(root):
    rep = index_laion(laion_cfg(root, max_samples=7, with_index=True))
    assert [o['index'] for o in objs(root/'laion_train.jsonl')] == list(range(7))
    assert rep.rows == 7
    assert index_laion(laion_cfg(root, max_samples=0)).train_lines == 0
    assert (root/'laion_train.jsonl').read_bytes() == b''


def test_rerun_is_byte_identical_and_leaves_no_temp_files(root):
    cfg = laion_cfg(root, val_ratio=0.2)
    index_laion(cfg)
    first = [(root/f).read_bytes() for f in ('laion_train.jsonl', 'laion_val.jsonl')]
    index_laion(cfg)
    assert [(root/f).read_bytes() for f in ('laion_train.jsonl', 'laion_val.jsonl')] == first
    assert sorted(p.name for p in root.iterdir()) == ['laion-1m-vit-h-14', 'laion_train.jsonl', 'laion_val.jsonl']


def test_corrupt_record_line_names_file_and_line_and_writes_nothing(root):
    index_laion(laion_cfg(root))
    before = (root/'laion_train.jsonl').read_bytes()
    log = root/'laion-1m-vit-h-14'/SAVED_FILE
    good = lines(log)
    log.write_text(''.join(good[:3] + ['{"index": 6, "path": \n'] + good[3:]), encoding='utf-8')
    with pytest.raises(BadRecordError, match=r'image_paths\.jsonl, line 4'):
        index_laion(laion_cfg(root))
    assert (root/'laion_train.jsonl').read_bytes() == before
    assert not list(root.glob('.*.tmp'))
    rep = index_laion(laion_cfg(root, skip_bad_lines=True))
    assert rep.bad_lines == [4] and rep.local == 12 and 'corrupt' in repr(rep)


def test_half_written_last_record_is_ignored(root):
    with open(root/'laion-1m-vit-h-14'/SAVED_FILE, 'a', encoding='utf-8') as f: f.write('{"index": 25, "pa')  # kill -9
    assert index_laion(laion_cfg(root)).local == 12


def test_records_last_word_wins(root):
    # row 2 re-downloaded to another file name: the later record is the one used
    laion = root/'laion-1m-vit-h-14'
    shutil.copy(laion/'images'/'2.jpg', laion/'images'/'2b.jpg')
    with RecordLog(laion) as log: log.saved(Saved(2, 'images/2b.jpg', url(2), caption(2), 65, 64, 1, 'x'))
    index_laion(laion_cfg(root))
    assert objs(root/'laion_train.jsonl')[2]['image'] == str((laion/'images'/'2b.jpg').resolve())


def test_download_dir_apart_from_the_dump(tmp_path):
    # `download_laion_images --output-dir ./laion_images` with the dump elsewhere
    root = tmp_path/'data'
    write_dump(tmp_path/'dump', 10, shards=1, meta='metadata')
    save_images(tmp_path/'laion_images', [1, 3])
    root.mkdir()
    rep = index_laion(laion_cfg(root, dir=tmp_path/'dump', download_dir=tmp_path/'laion_images', only_local=True))
    assert [o['image'] for o in objs(root/'laion_train.jsonl')] == [str(tmp_path/'laion_images'/'images'/f'{i}.jpg') for i in (1, 3)]
    assert rep.local == 2


def test_laion_dir_as_one_parquet_file_finds_the_downloads_in_its_root(root):
    # the guide's download default is --metadata .../metadate/metadata_000.parquet
    shard = root/'laion-1m-vit-h-14'/'metadate'/'metadata_000.parquet'
    rep = index_laion(laion_cfg(root, dir=shard, with_index=True))
    assert [o['index'] for o in objs(root/'laion_train.jsonl')] == list(range(10))
    assert rep.local == 5 and objs(root/'laion_train.jsonl')[8]['image'].endswith('/images/8.jpg')


def test_no_download_yet_uses_urls_and_says_so(tmp_path):
    root = tmp_path/'data'
    write_dump(root/'laion-1m-vit-h-14', 5, shards=1)
    rep = index_laion(laion_cfg(root))
    assert all('image_url' in o for o in objs(root/'laion_train.jsonl'))
    assert 'no image_paths.jsonl' in repr(rep)


def test_find_local_images_lists_each_folder_once(root):
    local = find_local_images(root/'laion-1m-vit-h-14')
    assert local.index.tolist() == list(range(0, 24, 2)) and local.present.all()
    (root/'laion-1m-vit-h-14'/'images'/'10.jpg').unlink()
    local = find_local_images(root/'laion-1m-vit-h-14')
    pos, gone = local.lookup(np.array([10, 12, 13, 100]))
    assert pos.tolist() == [-1, 6, -1, -1] and gone.tolist() == [True, False, False, False]


def test_laion_errors(tmp_path):
    assert issubclass(MakeIndexError, LaionNbError) and issubclass(MakeIndexError, ValueError)
    with pytest.raises(MakeIndexError, match='data root does not exist'):
        index_laion(laion_cfg(tmp_path/'nope'))
    with pytest.raises(MakeIndexError, match='no LAION dump here'):
        index_laion(laion_cfg(tmp_path))


# ---------------------------------------------------------------- ESC-50

@pytest.fixture
def esc(tmp_path):
    "A data root holding the demo's ESC-50 mini set under ESC-50/."
    root = tmp_path/'data_formal_alin'
    demo.make_demo_esc50(root/'ESC-50')
    return root


def esc_cfg(root, max_samples=None, **kw):
    return IndexConfig(data_root=root, laion=None, esc50=Esc50Index(**kw), max_samples=max_samples)


def csv_rows(root):
    return pd.read_csv(root/'ESC-50'/'meta'/'esc50.csv')


def test_esc50_folds_text_and_paths(esc):
    rep = index_esc50(esc_cfg(esc))
    meta = csv_rows(esc)
    audio = (esc/'ESC-50'/'audio').resolve()
    want = lambda rows: [{'text': 'the sound of ' + c.replace('_', ' '), 'audio': f'{audio}/{f}'}
                         for f, c in zip(rows['filename'], rows['category'])]
    assert objs(esc/'esc50_train.jsonl') == want(meta[meta['fold'] != 5])
    assert objs(esc/'esc50_val.jsonl') == want(meta[meta['fold'] == 5])
    assert lines(esc/'esc50_train.jsonl') == [json.dumps(o, ensure_ascii=False) + '\n' for o in objs(esc/'esc50_train.jsonl')]
    assert (rep.clips, rep.train_lines + rep.val_lines, rep.missing, rep.unreadable) == (len(meta), len(meta), 0, 0)
    assert rep.val_lines > 0 and rep.train_lines > 0
    assert pd.read_json(esc/'esc50_val.jsonl', lines=True).shape == (rep.val_lines, 2)


def test_esc50_val_fold_esc10_template(esc):
    meta = csv_rows(esc)
    index_esc50(esc_cfg(esc, val_fold=2))
    assert len(objs(esc/'esc50_val.jsonl')) == (meta['fold'] == 2).sum()
    rep = index_esc50(esc_cfg(esc, esc10=True, text_template='{category} (ESC-10)'))
    esc10 = meta[meta['esc10']]
    assert 0 < len(esc10) < len(meta) and rep.clips == len(esc10)
    got = objs(esc/'esc50_train.jsonl') + objs(esc/'esc50_val.jsonl')
    assert sorted(o['text'] for o in got) == sorted(c.replace('_', ' ') + ' (ESC-10)' for c in esc10['category'])


def test_esc50_missing_and_unreadable_clips_are_left_out(esc):
    meta = csv_rows(esc)
    audio = esc/'ESC-50'/'audio'
    gone, text, cut = meta['filename'][:3]
    (audio/gone).unlink()
    (audio/text).write_text('not a wav file')
    data = (audio/cut).read_bytes()
    (audio/cut).write_bytes(data[:len(data) // 2])  # header fine, audio cut short
    rep = index_esc50(esc_cfg(esc))
    written = {Path(o['audio']).name for o in objs(esc/'esc50_train.jsonl') + objs(esc/'esc50_val.jsonl')}
    assert written == set(meta['filename']) - {gone, text, cut}
    assert (rep.missing, rep.unreadable, rep.train_lines + rep.val_lines) == (1, 2, len(meta) - 3)
    problems = dict(rep.problems)
    assert problems[gone] == 'missing' and 'not a readable WAV' in problems[text] and 'cut short' in problems[cut]
    assert gone in repr(rep)


def test_esc50_master_folder_and_esc50_dir(esc, tmp_path):
    (esc/'ESC-50').rename(esc/'ESC-50-master')
    assert index_esc50(esc_cfg(esc)).folder == (esc/'ESC-50-master').resolve()
    other = tmp_path/'elsewhere'
    other.mkdir()
    (esc/'ESC-50-master').rename(other/'ESC-50-master')
    assert index_esc50(esc_cfg(esc, dir=other)).folder == (other/'ESC-50-master').resolve()  # the unzipped folder inside
    assert index_esc50(esc_cfg(esc, dir=other/'ESC-50-master')).train_lines > 0


def test_esc50_max_samples_and_byte_identical_rerun(esc):
    assert index_esc50(esc_cfg(esc, max_samples=3)).clips == 3
    index_esc50(esc_cfg(esc))
    first = [(esc/f).read_bytes() for f in ('esc50_train.jsonl', 'esc50_val.jsonl')]
    index_esc50(esc_cfg(esc))
    assert [(esc/f).read_bytes() for f in ('esc50_train.jsonl', 'esc50_val.jsonl')] == first


def test_esc50_csv_errors(esc):
    csv = esc/'ESC-50'/'meta'/'esc50.csv'
    text = csv.read_text(encoding='utf-8').splitlines()
    csv.write_text('\n'.join([text[0].replace('category', 'class')] + text[1:]) + '\n', encoding='utf-8')
    with pytest.raises(MakeIndexError, match=r'esc50\.csv, line 1: missing column\(s\) category'):
        index_esc50(esc_cfg(esc))
    bad = text[2].split(',')
    bad[ESC50_COLUMNS.index('fold')] = 'five'
    csv.write_text('\n'.join(text[:2] + [','.join(bad)] + text[3:]) + '\n', encoding='utf-8')
    with pytest.raises(MakeIndexError, match=r"esc50\.csv, line 3: fold is 'five'"):
        index_esc50(esc_cfg(esc))
    csv.unlink()
    with pytest.raises(MakeIndexError, match=r'ESC-50 csv not found.*--no-esc50'):
        index_esc50(esc_cfg(esc))


# ---------------------------------------------------------------- both, and the command

@pytest.fixture
def both(root):
    demo.make_demo_esc50(root/'ESC-50')
    return root


def run(*argv):
    "The real console command, bounded in time."
    return subprocess.run([str(MAKEINDEX), *map(str, argv)], capture_output=True, text=True, timeout=120)


def test_cli_help_explains_every_flag():
    out = run('--help')
    assert out.returncode == 0
    text = ' '.join(out.stdout.split())
    for flag in ('--laion', '--no-laion', '--esc50', '--no-esc50', '--data-root', '--laion-dir', '--download-dir', '--esc50-dir',
                 '--max-samples', '--only-local', '--with-index', '--val-ratio', '--esc50-val-fold', '--esc10',
                 '--skip-bad-lines', '--text-template', '--keep-failed', '--allow-private-networks', 'load_index',
                 'data_formal_alin', 'the sound of {category}'):
        assert flag in text, flag


FLAGS = {  # each config field: the flag the guide and the README name it by
    ('IndexConfig', 'data_root'): '--data-root', ('IndexConfig', 'max_samples'): '--max-samples',
    ('LaionIndex', 'dir'): '--laion-dir', ('LaionIndex', 'download_dir'): '--download-dir', ('LaionIndex', 'only_local'): '--only-local',
    ('LaionIndex', 'storage_options'): '--storage-options',
    ('LaionIndex', 'with_index'): '--with-index', ('LaionIndex', 'val_ratio'): '--val-ratio', ('LaionIndex', 'keep_failed'): '--keep-failed',
    ('LaionIndex', 'allow_private_networks'): '--allow-private-networks', ('LaionIndex', 'skip_bad_lines'): '--skip-bad-lines',
    ('Esc50Index', 'dir'): '--esc50-dir', ('Esc50Index', 'val_fold'): '--esc50-val-fold', ('Esc50Index', 'esc10'): '--esc10',
    ('Esc50Index', 'text_template'): '--text-template',
}


def test_cli_help_shows_each_dataclass_default():
    "One place for each default: the help of the real command states the dataclass's default of every field with a value."
    entries, flag = {}, None
    for line in run('--help').stdout.splitlines():
        m = re.match(r'  (--[a-z0-9-]+)', line)
        if m: flag = m.group(1); entries[flag] = line
        elif flag and line.startswith('   '): entries[flag] += line
        else: flag = None
    entries = {k: ' '.join(v.split()) for k, v in entries.items()}
    for cls in (IndexConfig, LaionIndex, Esc50Index):
        for f in fields(cls):
            if f.name in ('laion', 'esc50'): continue
            help = entries[FLAGS[cls.__name__, f.name]]  # every field has its flag
            if f.default is not None and not isinstance(f.default, bool): assert f'(default: {f.default})' in help, help
    assert len(entries) == len(FLAGS) + 2  # and --laion, --esc50


@pytest.mark.parametrize('flags,written', [
    ([], {'laion_train.jsonl', 'esc50_train.jsonl', 'esc50_val.jsonl'}),
    (['--laion', '--no-esc50'], {'laion_train.jsonl'}),
    (['--esc50', '--laion'], {'laion_train.jsonl', 'esc50_train.jsonl', 'esc50_val.jsonl'}),
    (['--laion'], {'laion_train.jsonl'}),
    (['--no-laion'], {'esc50_train.jsonl', 'esc50_val.jsonl'}),
    (['--esc50', '--esc10'], {'esc50_train.jsonl', 'esc50_val.jsonl'}),
])
def test_cli_selects_datasets(both, flags, written):
    code = main([*flags, '--data-root', str(both)])
    assert code == 0
    assert {p.name for p in both.glob('*.jsonl')} == written


def test_cli_end_to_end_prints_report(both):
    out = run('--esc50', '--laion', '--data-root', both, '--val-ratio', '0.2', '--with-index', '--only-local')
    assert out.returncode == 0, out.stderr
    assert 'LAION: 30 rows read' in out.stdout and 'ESC-50:' in out.stdout
    assert len(objs(both/'laion_train.jsonl')) + len(objs(both/'laion_val.jsonl')) == 12
    assert all('index' in o for o in objs(both/'laion_train.jsonl'))


def test_makeindex_checks_esc50_before_laion_writes(root):
    with pytest.raises(MakeIndexError, match='ESC-50 csv not found'):
        makeindex(IndexConfig(data_root=root))
    assert not (root/'laion_train.jsonl').exists()
    rep = makeindex(IndexConfig(data_root=root, esc50=None))
    assert rep.esc50 is None and rep.laion.train_lines == 30 and repr(rep).startswith('LAION')


def corrupt_records(root):
    with open(root/'laion-1m-vit-h-14'/SAVED_FILE, 'a', encoding='utf-8') as f: f.write('not json\n')


def wrong_columns(root):
    (root/'ESC-50'/'meta'/'esc50.csv').write_text('file,fold\n1-1-A-0.wav,1\n', encoding='utf-8')


@pytest.mark.parametrize('setup,argv,message', [
    (None, ['--data-root', '{tmp}/nope'], 'nope: data root does not exist (--data-root)'),
    (None, ['--no-laion', '--no-esc50'], 'neither dataset selected'),
    (None, ['--esc50', '--esc50-dir', '{root}/none'], 'none/meta/esc50.csv: ESC-50 csv not found'),
    (wrong_columns, ['--esc50'], 'esc50.csv, line 1: missing column(s) filename, target, category, esc10, src_file, take'),
    (corrupt_records, ['--laion'], 'image_paths.jsonl, line 13: not a valid Saved record'),
    (None, ['--laion', '--laion-dir', '{tmp}/nodump'], 'nodump: no LAION dump here (--laion-dir)'),
    (None, ['--laion', '--val-ratio', '1.5'], 'val_ratio (--val-ratio) must be in [0, 1)'),
    (None, ['--esc50', '--esc50-val-fold', '0'], '--esc50-val-fold'),
    (None, ['--esc50', '--text-template', 'sound'], 'no {category} field'),
])
def test_cli_errors_are_one_line_exit_2(both, tmp_path, setup, argv, message):
    if setup: setup(both)
    argv = [a.format(tmp=tmp_path, root=both) for a in argv]
    if '--data-root' not in argv: argv += ['--data-root', str(both)]
    out = run(*argv)
    assert out.returncode == 2
    assert out.stderr.startswith('makeindex: error: ') and out.stderr.count('\n') == 1, out.stderr
    assert message in out.stderr and 'Traceback' not in out.stderr
    assert out.stdout == ''


def test_cli_corrupt_line_hints_at_skip_bad_lines_which_goes_on(both):
    corrupt_records(both)
    out = run('--laion', '--data-root', both)
    assert '--skip-bad-lines' in out.stderr and out.returncode == 2
    out = run('--laion', '--data-root', both, '--skip-bad-lines')
    assert out.returncode == 0 and '1 corrupt line(s)' in out.stdout


# ---------------------------------------------------------------- what training may fetch (issues 11, 12)

REFUSED_BY_DOWNLOAD = {  # URL: the type the downloader records for it, without connecting anywhere
    'http://169.254.169.254/latest/meta-data/': 'blocked_address',
    'http://10.1.2.3/a.jpg': 'blocked_address',
    'http://[::ffff:127.0.0.1]/a.jpg': 'blocked_address',
    'http://[64:ff9b::a9fe:a9fe]/latest/meta-data/': 'blocked_address',
    'http://localhost/a.jpg': 'blocked_address',
    'file:///etc/passwd': 'invalid_url',
    'gopher://example.com/1': 'invalid_url',
}
NEVER_TRIED = {  # URL: what makeindex's own rules say of it (None: written)
    'http://2130706433/a.jpg': 'blocked_address',
    'http://0x7f.1/a.jpg': 'blocked_address',
    'http://printer.localhost/a.jpg': 'blocked_address',
    'http://[fe80::1%25eth0]/a.jpg': 'blocked_address',
    'https://user:pw@192.168.0.1:8443/a.jpg': 'blocked_address',
    'ftp://example.com/a.jpg': 'invalid_url',
    'https://img.example.com/ok.jpg': None,
    'http://93.184.216.34/ok.jpg': None,
}


def test_refused_urls_never_reach_training(tmp_path):
    "The real downloader refuses the first rows (recorded), the rest are past --max-samples; none of them is written."
    root = tmp_path/'data'
    urls = [*REFUSED_BY_DOWNLOAD, *NEVER_TRIED]
    laion = write_dump(root/'laion-1m-vit-h-14', len(urls), shards=2, urls=dict(enumerate(urls)))
    rep = download(DownloadConfig.build(metadata=laion, output_dir=laion, max_samples=len(REFUSED_BY_DOWNLOAD), timeout=1.0,
                                  retries=0, processes=1), progress=None)
    failed = read_failed(laion)
    assert dict(zip(failed['url'], failed['error_type'])) == REFUSED_BY_DOWNLOAD, 'the download refused them itself'
    rep = index_laion(laion_cfg(root, with_index=True))
    written = {o['index']: o for o in objs(root/'laion_train.jsonl')}
    keep = [i for i, u in enumerate(urls) if NEVER_TRIED.get(u, 'refused') is None]
    assert sorted(written) == keep and all(written[i]['image_url'] == urls[i] for i in keep)
    assert rep.refused == {'blocked_address': 5 + 5, 'invalid_url': 2 + 1}
    assert (rep.rows, rep.remote, rep.failed) == (len(urls), 2, {})
    assert 'URL refused (never given to training): 13 (10 blocked_address, 3 invalid_url)' in repr(rep)
    out = run('--laion', '--data-root', root)  # the CLI says the same
    assert out.returncode == 0 and '13 (10 blocked_address, 3 invalid_url)' in out.stdout, out.stdout
    # --allow-private-networks lets private addresses through, never a bad scheme nor what the download refused
    rep = index_laion(laion_cfg(root, allow_private_networks=True))
    assert rep.refused == {'blocked_address': 5, 'invalid_url': 3} and rep.remote == 7


def test_url_guard_answers_as_url_refusal_for_every_url():
    "The per-authority cache never changes an answer: same scheme and authority, same verdict, whatever the path."
    urls = [*REFUSED_BY_DOWNLOAD, *NEVER_TRIED, 'https://img.example.com/other.jpg?x=1#y', 'http://10.1.2.3/other',
            'http://a.example.com\\@10.0.0.1/x', 'http://a.example.com/x', 'HTTP://10.1.2.3/a', 'http:10.0.0.1/a', 'http:/10.0.0.1/a',
            '/relative/a.jpg', '?q', '', '  https://img.example.com/padded.jpg  ', 'https://img.example.com:99999/a.jpg',
            'https://exa mple.com/a.jpg', 'http://[::1]/a', 'http://[::1', 'http://127.1./a', 'http://1.2.3.4.5/a']
    kind = lambda why: why and why[0]  # the error type; the message is that of the first URL seen with the authority
    guard = UrlGuard()
    for u in urls + urls:
        assert kind(guard(u)) == kind(url_refusal(u)), u
    assert len(guard) < len(urls)


def serve(server, routes):
    return [server.url(r) for r in routes]


PERMANENT = {'status/404': 'http 404', 'status/410': 'http 410', 'html/1': 'not_image', 'small/2.jpg': 'too_small',
             'garbage/3.jpg': 'not_image'}
TRANSIENT = ['status/500', 'status/503', 'stall/4']


@pytest.mark.slow
def test_permanent_failures_are_left_out_unless_keep_failed(tmp_path):
    "A real download from the demo server: saved rows as image, transient failures and untried rows as image_url, permanent ones out."
    root = tmp_path/'data'
    with demo.ImageServer() as server:
        routes = ['img/10.jpg', *PERMANENT, *TRANSIENT, 'img/11.jpg', 'status/404', 'img/12.jpg']  # the last 3: past max_samples
        urls = serve(server, routes)
        laion = write_dump(root/'laion-1m-vit-h-14', len(urls), shards=2, urls=dict(enumerate(urls)))
        download(DownloadConfig.build(metadata=laion, output_dir=laion, max_samples=len(routes) - 3, timeout=1.0, retries=0,
                                processes=1, allow_private_networks=True), progress=None)
    failed = read_failed(laion)
    assert sorted(failed['index']) == list(range(1, len(routes) - 3))
    assert {t for t in failed['error_type']} >= {'http_status', 'not_image', 'too_small', 'timeout'}
    rep = index_laion(laion_cfg(root, with_index=True, allow_private_networks=True))
    got = {o['index']: ('image' if 'image' in o else 'image_url') for o in objs(root/'laion_train.jsonl')}
    n_perm, n_trans = len(PERMANENT), len(TRANSIENT)
    transient_rows = range(1 + n_perm, 1 + n_perm + n_trans)
    untried = range(len(routes) - 3, len(routes))
    assert got == {0: 'image', **{i: 'image_url' for i in transient_rows}, **{i: 'image_url' for i in untried}}
    assert rep.failed == {'http 404': 1, 'http 410': 1, 'not_image': 2, 'too_small': 1}
    assert rep.rows == rep.local + rep.remote + sum(rep.failed.values()) + sum(rep.refused.values()) + rep.no_caption
    assert 'download failed for good (--keep-failed keeps them): 5 (2 not_image, 1 http 404, 1 http 410, 1 too_small)' in repr(rep)
    # keep_failed keeps them as image_url, in the config and on the command line
    rep = index_laion(laion_cfg(root, with_index=True, allow_private_networks=True, keep_failed=True))
    assert rep.failed == {} and rep.remote == n_perm + n_trans + 3
    assert [o['index'] for o in objs(root/'laion_train.jsonl')] == list(range(len(routes)))
    out = run('--laion', '--data-root', root, '--allow-private-networks')
    assert out.returncode == 0 and '5 (2 not_image, 1 http 404, 1 http 410, 1 too_small)' in out.stdout, out.stdout
    assert len(objs(root/'laion_train.jsonl')) == len(routes) - n_perm
    out = run('--laion', '--data-root', root, '--allow-private-networks', '--keep-failed')
    assert out.returncode == 0 and len(objs(root/'laion_train.jsonl')) == len(routes)
    # without --allow-private-networks the demo server's 127.0.0.1 URLs are refused too
    rep = index_laion(laion_cfg(root))
    assert rep.remote == 0 and rep.refused == {'blocked_address': n_trans + 3} and rep.local == 1


def test_internal_failures_and_retried_rows_keep_their_url(root):
    "internal (our bug) is transient; a row saved after a failure is not failed; a corrupt error line names its file."
    laion = root/'laion-1m-vit-h-14'
    with RecordLog(laion) as log:
        log.failed(Failed(1, url(1), 'internal', None, 'KeyError in laion_nb', 1))
        log.failed(Failed(3, url(3), 'http_status', 429, 'too many requests', 1))
        log.failed(Failed(5, url(5), 'dns', None, 'cannot resolve', 1))
        log.failed(Failed(4, url(4), 'http_status', 404, 'not found', 1))  # 4 is saved: its image is used
    rep = index_laion(laion_cfg(root, with_index=True))
    got = {o['index']: o for o in objs(root/'laion_train.jsonl')}
    assert 'image_url' in got[1] and 'image_url' in got[3] and 'image' in got[4] and 5 not in got
    assert rep.failed == {'dns': 1}
    with open(laion/FAILED_LOG, 'a', encoding='utf-8') as f: f.write('{"index": 7, "url"\n')
    with pytest.raises(BadRecordError, match=f'{FAILED_LOG}, line 5'):
        index_laion(laion_cfg(root))
    rep = index_laion(laion_cfg(root, skip_bad_lines=True))
    assert rep.failed == {'dns': 1} and any(FAILED_LOG in n for n in rep.notes)


def test_line_separators_in_captions_stay_on_one_line(tmp_path):
    root = tmp_path/'data'
    odd = {0: 'line\u2028sep', 1: 'para\u2029sep', 2: 'next\x85line', 3: 'all \u2028\u2029\x85 three', 4: 'form\x0cfeed\x0bvt\x1cfs'}
    laion = write_dump(root/'laion-1m-vit-h-14', 8, shards=2, captions=odd)
    save_images(laion, [0, 2], n_caption=lambda i: odd.get(i, caption(i)))
    rep = index_laion(laion_cfg(root))
    text = (root/'laion_train.jsonl').read_text(encoding='utf-8')
    assert len(text.splitlines()) == rep.train_lines == 8
    assert [json.loads(l)['text'] for l in text.splitlines()] == [odd.get(i, caption(i)) for i in range(8)]
    assert '\u2028' not in text and '\u2029' not in text and '\x85' not in text
    line = jsonl_line({'text': odd[3], 'audio': '/a/\u2028.wav'})
    assert len(line.splitlines()) == 1 and json.loads(line) == {'text': odd[3], 'audio': '/a/\u2028.wav'}


def test_empty_or_headless_wav_says_what_is_wrong(esc):
    meta = csv_rows(esc)
    audio = esc/'ESC-50'/'audio'
    empty, short = meta['filename'][:2]
    (audio/empty).write_bytes(b'')
    (audio/short).write_bytes(b'RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00')  # cut inside the fmt chunk
    rep = index_esc50(esc_cfg(esc))
    problems = dict(rep.problems)
    assert problems[empty] == 'not a readable WAV file (empty file)'
    assert problems[short] == 'not a readable WAV file (the file ends inside its header, after 22 bytes)'
    assert '()' not in repr(rep)
    assert wav_problem(audio/empty) == problems[empty]


# ---------------------------------------------------------------- loading with Hugging Face datasets

@pytest.mark.slow
def test_load_index_when_the_first_block_is_all_local(tmp_path):
    "100,000 downloaded rows then rows with image_url: a plain load_dataset fails on the columns, load_index does not."
    datasets = pytest.importorskip('datasets')
    n_local, n_url = 100_000, 20
    root = tmp_path/'data'
    laion = write_dump(root/'laion-1m-vit-h-14', n_local + n_url, shards=2)
    (laion/'images').mkdir()
    for k in range(1000): (laion/'images'/f'{k}.jpg').touch()  # makeindex checks the file is there, not what it holds
    with RecordLog(laion) as log:  # rows share 1,000 files: creating 100,000 files takes a minute on a busy disk
        for i in range(n_local): log.saved(Saved(i, f'images/{i % 1000}.jpg', url(i), caption(i), 64, 64, 0, '0' * 64))
    rep = index_laion(laion_cfg(root, with_index=True))
    assert (rep.local, rep.remote) == (n_local, n_url)
    path = root/'laion_train.jsonl'
    assert path.stat().st_size * n_local / (n_local + n_url) > 10 << 20, 'the first 10 MB block holds only image lines'
    with pytest.raises(Exception) as plain:  # the problem load_index exists for
        datasets.load_dataset('json', data_files=str(path), split='train', cache_dir=str(tmp_path/'hf0'))
    cause = plain.value.__cause__ or plain.value
    assert 'column names don' in str(cause) and 'image_url' in str(cause), repr(cause)
    ds = load_index(path, cache_dir=str(tmp_path/'hf'))
    assert ds.num_rows == n_local + n_url and ds.column_names == ['text', 'image', 'image_url', 'index']
    assert ds[1001] == {'text': caption(1001), 'image': str((laion/'images'/'1.jpg').resolve()), 'image_url': None, 'index': 1001}
    last = ds[n_local + n_url - 1]
    assert last['image'] is None and last['image_url'] == url(n_local + n_url - 1) and last['text'] == caption(n_local + n_url - 1)
    assert sum(x is not None for x in ds['image_url']) == n_url


def test_load_index_reads_esc50_and_url_only_files(esc, tmp_path):
    pytest.importorskip('datasets')
    index_esc50(esc_cfg(esc))
    ds = load_index(esc/'esc50_val.jsonl', cache_dir=str(tmp_path/'hf'))
    assert ds.column_names == ['text', 'audio'] and ds.num_rows == len(objs(esc/'esc50_val.jsonl'))
    (esc/'urls.jsonl').write_text(jsonl_line({'text': 'a', 'image_url': 'https://e.com/a.jpg'}), encoding='utf-8')
    ds = load_index(esc/'urls.jsonl', cache_dir=str(tmp_path/'hf'))
    assert ds.column_names == ['text', 'image', 'image_url'] and ds[0]['image'] is None


def test_load_index_without_datasets_says_what_to_install(tmp_path):
    "In a Python where `datasets` cannot be imported, one line naming the package."
    code = ("import sys; sys.modules['datasets'] = None\n"
            "from laion_nb.makeindex import load_index\n"
            "try: load_index(sys.argv[1])\n"
            "except ImportError as e: print(repr(str(e)))\n")
    (tmp_path/'a.jsonl').write_text('{"text": "a", "image_url": "https://e.com/a.jpg"}\n', encoding='utf-8')
    out = subprocess.run([sys.executable, '-c', code, str(tmp_path/'a.jsonl')], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == repr('load_index needs Hugging Face datasets: pip install datasets'), out.stderr
