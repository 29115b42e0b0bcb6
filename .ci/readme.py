"""README.md is nbs/index.ipynb rendered to Markdown (nbdev_readme needs Quarto, which we lack).

  python .ci/readme.py                 write README.md from nbs/index.ipynb
  python .ci/readme.py --check         fail if README.md differs from the render
  python .ci/readme.py --test-command  print the README's test command (the fenced line after <!-- test-command -->)
"""
import json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
nb_path, readme_path = root/'nbs'/'index.ipynb', root/'README.md'
directive = re.compile(r'^\s*#\s*\|')

def render(nb):
    "Markdown cells as they are, visible code cells fenced; `#| hide` cells and directives left out."
    parts = []
    for cell in nb['cells']:
        src = ''.join(cell['source']).strip('\n')
        if cell['cell_type'] == 'markdown': parts.append(src)
        elif cell['cell_type'] == 'code':
            lines = src.splitlines()
            if any(re.match(r'^\s*#\s*\|\s*hide\b', l) for l in lines): continue
            code = '\n'.join(l for l in lines if not directive.match(l)).strip('\n')
            if code: parts.append(f'```python\n{code}\n```')
    return '<!-- Generated from nbs/index.ipynb by .ci/readme.py: edit the notebook, not this file. -->\n\n' + '\n\n'.join(parts) + '\n'

def test_command(text):
    m = re.search(r'<!-- test-command -->\s*```\w*\n(.+?)\n```', text, re.S)
    if not m: sys.exit('README.md has no fenced block after <!-- test-command -->')
    return m.group(1).strip()

if __name__ == '__main__':
    arg = sys.argv[1] if len(sys.argv) > 1 else ''
    want = render(json.loads(nb_path.read_text(encoding='utf-8')))
    if arg == '--check':
        if readme_path.read_text(encoding='utf-8') != want:
            sys.exit('README.md is not nbs/index.ipynb rendered: run python .ci/readme.py and commit.')
    elif arg == '--test-command': print(test_command(readme_path.read_text(encoding='utf-8')))
    elif arg == '': readme_path.write_text(want, encoding='utf-8')
    else: sys.exit(__doc__)
