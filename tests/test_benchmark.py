"""Smoke test of benchmarks/benchmark.py: a tiny configuration, one iteration, JSON output (no timing checks)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / 'benchmarks' / 'benchmark.py'


def _run(*args: str) -> dict:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')]))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), '--json', '--in-process', '--device', 'cpu', '--warmup', '0', '--iters', '1',
         *args],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_benchmark_model_json():
    doc = _run('--model', 'internimage_t', '--batch-size', '2', '--img-size', '32', '--mode', 'infer,train',
               '--backend', 'torch', '--model-kwargs', 'channels=16', 'depths=[1,1,1,1]')
    results = doc['results']
    assert [r['config']['mode'] for r in results] == ['infer', 'train']
    for r in results:
        assert 'error' not in r
        assert r['kind'] == 'model'
        assert r['config']['backend'] == 'torch' and r['config']['dtype'] == 'float32'
        assert r['img_per_s'] > 0 and r['median_ms'] > 0 and r['iters'] == 1
        assert r['params_m'] > 0
        assert r['peak_mem_mib'] is None or r['peak_mem_mib'] >= 0
        assert r['env']['torch'] and r['env']['device'] == 'cpu'


def test_benchmark_op_json():
    doc = _run('--op', '--batch-size', '1', '--backend', 'torch')
    (result,) = doc['results']
    assert 'error' not in result and result['kind'] == 'op'
    shapes = [(s['shape']['H'], s['shape']['C'], s['shape']['G']) for s in result['shapes']]
    assert shapes == [(56, 64, 4), (28, 128, 8), (14, 256, 16), (7, 512, 32)]
    for s in result['shapes']:
        assert s['fwd_ms'] > 0 and s['bwd_ms'] > 0


def test_benchmark_rounds_report_medians_and_speedups():
    doc = _run('--model', 'internimage_t', '--batch-size', '1', '--img-size', '32', '--backend', 'torch,reference',
               '--rounds', '3', '--model-kwargs', 'channels=16', 'depths=[1,1,1,1]')
    first, second = doc['results']
    assert [r['config']['backend'] for r in (first, second)] == ['torch', 'reference']
    for r in (first, second):
        assert len(r['round_ms']) == 3 and r['median_ms'] == sorted(r['round_ms'])[1]
        assert r['img_per_s'] == 1 / (r['median_ms'] / 1e3)
    assert first['speedup'] == 1.0 and second['speedup'] > 0


def _load_benchmark():
    import importlib.util
    spec = importlib.util.spec_from_file_location('_benchmark_under_test', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configurations_for_peers_compile_modes_and_the_fused_linear_switch():
    bench = _load_benchmark()
    args = bench.build_parser().parse_args([
        '--peers', '--backend', 'reference,compiled', '--fused-linear', 'on,off', '--compile', 'eager,freezing',
        '--mode', 'infer,train', '--batch-size', '1,8', '--img-size', '224'])
    configs = bench._configs(args)
    keys = [(c['mode'], c['batch_size'], c['model'], c['backend'], c['fused_linear'], c['compile']) for c in configs]
    assert len(keys) == len(set(keys))
    for mode in ('infer', 'train'):
        for batch in (1, 8):
            ours = [k for k in keys if k[:3] == (mode, batch, 'internimage_t')]
            compiles = ['eager', 'freezing'] if mode == 'infer' else ['eager']  # freezing is for inference
            assert len(ours) == 2 * 2 * len(compiles)
            for peer in bench.PEERS:  # timm's models: one configuration per compile mode, no DCNv3 settings
                assert [k[3:] for k in keys if k[:3] == (mode, batch, peer)] == [
                    ('none', 'on', False if c == 'eager' else c) for c in compiles]
    assert configs[0]['backend'] == 'reference' and configs[0]['model'] == 'internimage_t'


def test_settings_reach_the_package_through_its_environment():
    bench = _load_benchmark()
    env = {'TIMM_INTERNIMAGE_DCNV3_BACKEND': 'torch', 'TIMM_INTERNIMAGE_FUSED_LINEAR': '0'}
    bench._apply_settings({'backend': 'compiled', 'fused_linear': 'on'}, env)
    assert env == {'TIMM_INTERNIMAGE_DCNV3_BACKEND': 'compiled'}
    bench._apply_settings({'backend': 'auto', 'fused_linear': 'off'}, env)
    assert env == {'TIMM_INTERNIMAGE_FUSED_LINEAR': '0'}


def test_benchmark_lists_and_compile_modes_run():
    doc = _run('--model', 'internimage_t', '--batch-size', '1,2', '--img-size', '32', '--backend', 'torch',
               '--fused-linear', 'on,off', '--model-kwargs', 'channels=16', 'depths=[1,1,1,1]')
    assert [(r['config']['batch_size'], r['config']['fused_linear']) for r in doc['results']] == [
        (1, 'on'), (1, 'off'), (2, 'on'), (2, 'off')]
    assert all('error' not in r for r in doc['results'])
