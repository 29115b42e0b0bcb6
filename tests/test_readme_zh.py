"""README.zh-CN.md, for the guide's readers: every command it shows parses, every flag it names exists,
and the guide's own `python download_laion_images.py` / `python makeindex.py` run from the project root."""
import re, shlex, subprocess, sys
from pathlib import Path

import pytest

from laion_nb import cli, makeindex

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT/'README.zh-CN.md').read_text(encoding='utf-8')
PARSERS = {'download_laion_images': cli._parser, 'download_laion_images.py': cli._parser,
           'makeindex': makeindex._parser, 'makeindex.py': makeindex._parser}


def commands():
    "Every command line of the bash blocks that runs one of the two tools: (tool, its arguments)."
    for block in re.findall(r'```bash\n(.*?)```', TEXT, re.S):
        for line in block.splitlines():
            words = shlex.split(line.split(' #')[0], comments=True)
            if words[:1] == ['python']: words = words[1:]
            if words and words[0] in PARSERS: yield words[0], words[1:]


def test_the_readme_shows_both_tools_both_ways():
    tools = {tool for tool, _ in commands()}
    assert {'download_laion_images.py', 'makeindex.py', 'download_laion_images'} <= tools, tools


@pytest.mark.parametrize('tool,args', list(commands()), ids=lambda v: ' '.join(v) if isinstance(v, list) else v)
def test_every_command_parses(tool, args):
    if args == ['--help']: return  # argparse exits on --help: its flags are checked below
    PARSERS[tool]().parse_args(args)  # an unknown flag or a bad value exits with 2 here


def test_every_flag_named_exists():
    known = {o for make in {cli._parser, makeindex._parser} for a in make()._actions for o in a.option_strings}
    named = set(re.findall(r'`(--[a-z0-9-]+)', TEXT)) | {w for _, args in commands() for w in args if w.startswith('--')}
    assert named, 'no flag found: the pattern no longer matches the README'
    assert not named - known, f'README.zh-CN.md names flags no command has: {sorted(named - known)}'


def test_readme_links_both_ways():
    assert '(README.md)' in TEXT and '(README.zh-CN.md)' in (ROOT/'README.md').read_text(encoding='utf-8')


@pytest.mark.parametrize('script,word', [('download_laion_images.py', 'usage: download_laion_images'), ('makeindex.py', 'usage: makeindex')])
def test_the_guides_commands_run_from_the_root(script, word):
    r = subprocess.run([sys.executable, script, '--help'], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith(word), r.stderr
