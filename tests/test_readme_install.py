"""The README's install-from-clone commands, run as written in a fresh virtual environment.

The commands are read from the README's ``bash`` block after the ``install-from-clone`` marker, so the test
follows the README. They run in a new environment on a copy of this working tree named as the ``git clone``
line names it (that line is the only one not run: it would need the network). No package index is used: the
new environment sees this one's packages (torch, timm, setuptools ...) but not this project's two through a
``.pth`` file, and pip builds without isolation. It checks what the commands must achieve: the package and the compiled op installed in the
new environment, the automatic DCNv3 backend using the op, and a model running.

The install is slow (the op is compiled: about a minute on 2 cores), so it runs only with TIMM_INTERNIMAGE_README_INSTALL=1;
``scripts/release_check.sh`` (and so CI) sets it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO_ROOT

MARKER = '<!-- install-from-clone'

slow = pytest.mark.skipif(os.environ.get('TIMM_INTERNIMAGE_README_INSTALL') != '1',
                          reason='slow: set TIMM_INTERNIMAGE_README_INSTALL=1 (scripts/release_check.sh does)')

_CHECK = r"""
import sys
from pathlib import Path
import timm, torch
import timm_internimage, timm_internimage_dcnv3
from timm_internimage.ops import compiled_backend_available

prefix = Path(sys.prefix).resolve()
for module in (timm_internimage, timm_internimage_dcnv3):
    assert prefix in Path(module.__file__).resolve().parents, f'{module.__name__} from {module.__file__}, not {prefix}'
assert compiled_backend_available(torch.device('cpu')), 'the automatic backend does not use the compiled op'
model = timm.create_model('internimage_t', channels=16, depths=(1, 1, 1, 1), groups=(1, 2, 4, 8)).eval()
with torch.no_grad():
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
print('README-INSTALL-OK')
"""


def readme_install_commands(readme: str) -> tuple[str, list[str]]:
    """``(folder the clone creates, the other command lines)`` of the README's install-from-clone block."""
    after = readme[readme.index(MARKER):]
    block = re.search(r'```bash\n(.*?)```', after, re.S)
    assert block, 'no ```bash block after the install-from-clone marker'
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    clone = re.match(r'git clone (\S+?)(?:\.git)?(?:\s|$)', lines[0])
    assert clone, f'the block does not start with `git clone URL`: {lines[0]!r}'
    return clone.group(1).rstrip('/').rsplit('/', 1)[-1], lines[1:]


def _copy_working_tree(destination: Path) -> None:
    """Copy the files git tracks or would track (untracked, not ignored) here, as a fresh clone of them."""
    listed = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'], cwd=REPO_ROOT,
                            capture_output=True)
    if listed.returncode != 0:
        pytest.skip('not a git checkout')
    for name in filter(None, listed.stdout.decode().split('\0')):
        source = REPO_ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def _dependencies_view(view: Path) -> Path:
    """A folder of links to this environment's installed packages, except this project's two: the commands
    must install those (a compiled op already here would also satisfy ``pip install ".[compiled]"``)."""
    view.mkdir()
    for folder in sorted({sysconfig.get_paths()[kind] for kind in ('purelib', 'platlib')}):
        for entry in Path(folder).iterdir():
            name = entry.name.lower().replace('-', '_')
            if 'timm_internimage' not in name and not (view / entry.name).exists():
                (view / entry.name).symlink_to(entry)
    return view


def test_readme_parsing_finds_the_commands():
    folder, commands = readme_install_commands((REPO_ROOT / 'README.md').read_text(encoding='utf-8'))
    assert folder == 'timm-internimage'
    assert commands[0] == f'cd {folder}'
    assert any(command.startswith('pip install .') for command in commands)


@slow
def test_readme_install_from_clone_in_a_fresh_environment(tmp_path):
    if shutil.which('c++') is None and shutil.which('g++') is None:
        pytest.skip('no C++ compiler')
    folder, commands = readme_install_commands((REPO_ROOT / 'README.md').read_text(encoding='utf-8'))
    _copy_working_tree(tmp_path / folder)
    env_dir = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', str(env_dir)], check=True)
    python = env_dir / 'bin' / 'python'
    site = subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, 'this_environment.pth').write_text(f'{_dependencies_view(tmp_path / "dependencies")}\n')
    env = {key: value for key, value in os.environ.items() if not key.startswith(('PIP_', 'PYTHON', 'VIRTUAL_ENV'))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX='1', PIP_NO_BUILD_ISOLATION='0',
               PIP_DISABLE_PIP_VERSION_CHECK='1', PIP_NO_CACHE_DIR='1', TIMM_INTERNIMAGE_DCNV3_BACKEND='auto',
               CHECK=_CHECK)
    # The venv's own old setuptools would hide this environment's (torch needs setuptools >= 77); on a machine
    # with network, pip upgrades it instead.
    subprocess.run([str(python), '-m', 'pip', 'uninstall', '-q', '-y', 'setuptools'], env=env, check=True)

    script = '\n'.join(['set -euo pipefail', f'. {env_dir}/bin/activate', *commands,
                        f'cd {tmp_path}', f'python -c "$CHECK"'])
    done = subprocess.run(['bash', '-c', script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and 'README-INSTALL-OK' in done.stdout, done.stdout[-4000:] + done.stderr[-4000:]
