"makeindex on real files: parquet dumps, real JPEGs recorded with records.RecordLog, the demo's ESC-50 mini set with real WAVs."
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest
from PIL import Image

from laion_nb import demo
from laion_nb.makeindex import (ESC50_COLUMNS, IndexConfig, MakeIndexError, find_local_images, index_esc50, index_laion,
                                main, makeindex, val_mask)
from laion_nb.records import SAVED_FILE, BadRecordError, RecordLog, Saved

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


def laion_cfg(root, **kw):
    return IndexConfig(root, esc50=False, **kw)


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
    rep = index_laion(laion_cfg(root, laion_dir=tmp_path/'dump', download_dir=tmp_path/'laion_images', only_local=True))
    assert [o['image'] for o in objs(root/'laion_train.jsonl')] == [str(tmp_path/'laion_images'/'images'/f'{i}.jpg') for i in (1, 3)]
    assert rep.local == 2


def test_laion_dir_as_one_parquet_file_finds_the_downloads_in_its_root(root):
    # the guide's download default is --metadata .../metadate/metadata_000.parquet
    shard = root/'laion-1m-vit-h-14'/'metadate'/'metadata_000.parquet'
    rep = index_laion(laion_cfg(root, laion_dir=shard, with_index=True))
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


def esc_cfg(root, **kw):
    return IndexConfig(root, laion=False, **kw)


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
    index_esc50(esc_cfg(esc, esc50_val_fold=2))
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
    assert index_esc50(esc_cfg(esc, esc50_dir=other)).folder == (other/'ESC-50-master').resolve()  # the unzipped folder inside
    assert index_esc50(esc_cfg(esc, esc50_dir=other/'ESC-50-master')).train_lines > 0


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
                 '--skip-bad-lines', '--text-template', 'data_formal_alin', 'the sound of {category}'):
        assert flag in text, flag


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
        makeindex(IndexConfig(root))
    assert not (root/'laion_train.jsonl').exists()
    rep = makeindex(IndexConfig(root, esc50=False))
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
