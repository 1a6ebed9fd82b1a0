"""scripts/gpu_check.sh: the CPU smoke run end to end, and the table / exit-status logic."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, import_file



def _load_gpu_check():
    return import_file('scripts/gpu_check.py')


def _table(stdout: str) -> dict:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if line.startswith('| ') and len(cells) == 3 and cells[0] != 'check':
            rows[cells[0]] = (cells[1], cells[2])
    return rows


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('timm_internimage_dcnv3') is None,
                    reason='compiled DCNv3 op not installed (the script would install it)')
def test_cpu_smoke_run(tmp_path):
    report = tmp_path / 'report.json'
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(['bash', str(REPO_ROOT / 'scripts' / 'gpu_check.sh'), '--device', 'cpu', '--json', str(report)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _table(proc.stdout)
    either = {'PASS', 'SKIP'}
    expected = {
        'compiled op wheel': {'PASS'},
        'pytest tests/test_compiled_op.py -k cuda': either,  # SKIP while every selected test needs a GPU
        'cuda_semantics cases (compiled, float64)': {'PASS'},
        'non-default stream': {'SKIP'},
        'CUDA graph replay': {'SKIP'},
        'torch.compile reduce-overhead': {'PASS'},
        'cuda:1': {'SKIP'},
        'op N=1 56x56 C=64 G=4': {'PASS'},
        'op N=1 28x28 C=128 G=8': {'PASS'},
        'op N=1 14x14 C=256 G=16': {'PASS'},
        'op N=1 7x7 C=512 G=32': {'PASS'},
        'op N=32': {'SKIP'},
        'dcnv4 golden cases (compiled, float64)': {'PASS'},
        'dcnv4 compiled vs torch float64': {'PASS'},
        'dcnv4 compiled vs torch float32': {'PASS'},
        'dcnv4 compiled vs torch float16': {'PASS'},
        'dcnv4 compiled vs torch bfloat16': {'PASS'},
        'dcnv4 vs dcnv3 N=1 56x56 C=64 G=4 float32': {'PASS'},
        'dcnv4 vs dcnv3 N=1 28x28 C=128 G=8 float32': {'PASS'},
        'dcnv4 vs dcnv3 N=1 14x14 C=256 G=16 float32': {'PASS'},
        'dcnv4 vs dcnv3 N=1 7x7 C=512 G=32 float32': {'PASS'},
        'internimage_t fp32': {'PASS'},
        'internimage_t fp16 autocast': {'PASS'},
        'internimage_t bf16 autocast': {'PASS'},
        'internimage_b': {'SKIP'},
        'bf16 input > 2^31 elements': {'SKIP'},
    }
    assert list(rows) == list(expected), proc.stdout
    for name, (result, notes) in rows.items():
        assert result in expected[name], f'{name}: {result} {notes}'
    assert 'needs CUDA' in rows['non-default stream'][1]
    assert 'rel. error output' in rows['bf16 input > 2^31 elements'][1]  # the crop comparison ran at small size
    assert 'DCNv4 kernels ran: True' in rows['dcnv4 compiled vs torch float16'][1]
    doc = json.loads(report.read_text())
    assert doc['exit_code'] == 0 and doc['device'] == 'cpu'
    assert [r['check'] for r in doc['rows']] == list(rows)


def test_a_failing_check_fails_the_run(capsys):
    gpu_check = _load_gpu_check()
    Row, ctx = gpu_check.Row, gpu_check.Context(gpu_check.torch.device('cpu'))

    def broken(_):
        raise RuntimeError('kernel exploded\nsecond line')

    checks = [
        ('good', lambda _: gpu_check.Row('good', gpu_check.PASS, 'fine')),
        ('skipped', lambda _: [gpu_check.Row('skipped', gpu_check.SKIP, 'no GPU')]),
        ('bad', lambda _: gpu_check.Row('bad', gpu_check.FAIL, 'max diff 1')),
        ('broken', broken),
    ]
    rows = gpu_check.run_checks(checks, ctx)
    assert [(r.check, r.result) for r in rows] == [
        ('good', 'PASS'), ('skipped', 'SKIP'), ('bad', 'FAIL'), ('broken', 'FAIL')]
    assert rows[-1].notes == 'RuntimeError: kernel exploded'
    assert gpu_check.finish(rows) == 1
    table = _table(capsys.readouterr().out)
    assert table['bad'] == ('FAIL', 'max diff 1') and table['good'] == ('PASS', 'fine')

    assert gpu_check.exit_code(rows[:2]) == 0
    assert gpu_check.exit_code(rows[2:3]) == 1
    assert gpu_check.exit_code([Row('odd', 'MAYBE')]) == 1
    assert gpu_check.exit_code([Row('pipe', gpu_check.PASS, 'a | b')]) == 0
    assert gpu_check.render_table([Row('pipe', gpu_check.PASS, 'a | b')]).splitlines()[-1] == '| pipe | PASS | a / b |'
