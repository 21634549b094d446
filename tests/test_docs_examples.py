"""Every ```python block of README.md and docs/*.md runs on its own, in a fresh interpreter, offline.

A block preceded by `<!-- not-run: REASON -->` (network or a trained run needed) is skipped and must give a reason.
Relative links between the pages point to files that exist.
"""
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Tuple


ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
FENCE = re.compile(r'^```(\w*)\n(.*?)^```$', re.M | re.S)
NOT_RUN = re.compile(r'<!-- not-run: (.+?) -->\s*$')
LINK = re.compile(r'\]\(([^)#\s]+)(?:#[^)]*)?\)')


def python_blocks(text: str) -> List[Tuple[int, str, str]]:
    """(line number, code, not-run reason or '') of each ```python block of a Markdown text."""
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) != 'python':
            continue
        before = text[:match.start()].rstrip('\n').rsplit('\n', 1)[-1]
        reason = NOT_RUN.search(before)
        blocks.append((text.count('\n', 0, match.start()) + 1, match.group(2), reason.group(1) if reason else ''))
    return blocks


BLOCKS = [(page, *block) for page in PAGES for block in python_blocks(page.read_text())]


def test_python_blocks_finds_blocks_and_markers():
    text = ('intro\n```python\na = 1\n```\n```bash\nls\n```\n<!-- not-run: needs the Hub -->\n'
            '```python\nb = 2\n```\n')
    assert python_blocks(text) == [(2, 'a = 1\n', ''), (9, 'b = 2\n', 'needs the Hub')]


def test_every_page_is_covered_and_markers_are_rare():
    pages = {page.name for page, *_ in BLOCKS}
    assert {'README.md', 'meta_layers.md', 'models.md', 'performance.md'} <= pages
    skipped = [(page.name, line, reason) for page, line, _, reason in BLOCKS if reason]
    assert len(skipped) <= len(BLOCKS) // 3, skipped
    assert all(len(reason.split()) >= 3 for *_, reason in skipped), skipped


def test_relative_links_resolve():
    links = [(page.name, target) for page in PAGES for target in LINK.findall(page.read_text())
             if '://' not in target]
    assert len(links) >= 10
    broken = [(name, target) for name, target in links
              if not (ROOT / ('docs' if name != 'README.md' else '.') / target).resolve().exists()]
    assert not broken, broken


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])),
           'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}
    return subprocess.run([sys.executable, '-c', code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_each_python_block_runs_alone(tmp_path):
    """Each block in its own interpreter and folder: a block that needs an earlier block's names fails."""
    runnable = [(page, line, code) for page, line, code, reason in BLOCKS if not reason]
    folders = [tmp_path / f'{page.stem}-{line}' for page, line, _ in runnable]
    for folder in folders:
        folder.mkdir()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_run, [code for *_, code in runnable], folders))
    failures = [f'{page.relative_to(ROOT)}:{line}\n{done.stderr[-2000:]}'
                for (page, line, _), done in zip(runnable, results) if done.returncode != 0]
    assert not failures, '\n\n'.join(failures)
