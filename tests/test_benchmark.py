"""Smoke test of benchmarks/benchmark.py: a tiny configuration, one iteration, JSON output (no timing checks)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, import_file

SCRIPT = REPO_ROOT / 'benchmarks' / 'benchmark.py'


def _run(*args: str) -> dict:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get('PYTHONPATH')]))
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
    return import_file('benchmarks/benchmark.py')


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


def test_flash_internimage_gets_the_op_settings_like_internimage():
    bench = _load_benchmark()
    args = bench.build_parser().parse_args([
        '--model', 'internimage_t,flash_internimage_t,convnext_tiny', '--backend', 'torch,compiled'])
    settings = {}
    for config in bench._configs(args):
        settings.setdefault(config['model'], []).append(config['backend'])
    assert settings == {'internimage_t': ['torch', 'compiled'], 'flash_internimage_t': ['torch', 'compiled'],
                        'convnext_tiny': ['none']}


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



def _expected_configs(options, op=False, peers=False, in_process=False):
    """The configurations asked for by ``options`` (``{'--dtype': 'float32,bfloat16', ...}``), written out in
    the documented order: dtype, batch, resolution, mode, model, backend, fused linear, compile mode (--op:
    dtype, batch, backend, compile mode, shape group). timm's models get one configuration per compile mode."""
    split = lambda option, default: options.get(option, default).split(',')  # noqa: E731
    common = {'op': op, 'device': 'auto', 'threads': 0, 'warmup': 2, 'iters': 5, 'clock': 'wall'}
    compiled = lambda mode: False if mode == 'eager' else mode  # noqa: E731
    if op:
        groups = [[0, 1, 2, 3]] if in_process else [[0], [1], [2], [3]]
        return [{**common, 'dtype': d, 'batch_size': int(b), 'backend': be, 'compile': compiled(c), 'shapes': s}
                for d in split('--dtype', 'float32') for b in split('--batch-size', '8')
                for be in split('--backend', 'auto') for c in split('--compile', 'eager') for s in groups]
    models = split('--model', 'internimage_t') + (['convnext_tiny', 'swin_tiny_patch4_window7_224', 'resnet50']
                                                  if peers else [])
    ours = lambda model: model.startswith('internimage')  # noqa: E731
    return [{**common, 'dtype': d, 'batch_size': int(b), 'img_size': int(r), 'mode': mode, 'model': m,
             'backend': be, 'fused_linear': f, 'compile': compiled(c), 'in_chans': 3, 'channels_last': False,
             'amp': False, 'model_kwargs': {'channels': 16} if ours(m) else {}}
            for d in split('--dtype', 'float32') for b in split('--batch-size', '8')
            for r in split('--img-size', '224') for mode in split('--mode', 'infer')
            for m in models
            for be in (split('--backend', 'auto') if ours(m) else ['none'])
            for f in (split('--fused-linear', 'on') if ours(m) else ['on'])
            for c in split('--compile', 'eager') if not (c == 'freezing' and mode == 'train')]


def test_configurations_run_in_the_documented_order():
    bench = _load_benchmark()
    model_options = {'--model': 'internimage_t,resnet18', '--dtype': 'float32,bfloat16', '--batch-size': '1,8',
                     '--img-size': '224,384', '--mode': 'infer,train', '--backend': 'reference,compiled',
                     '--fused-linear': 'on,off', '--compile': 'eager,default,freezing'}
    op_options = {'--dtype': 'float32,float64', '--batch-size': '1,4', '--backend': 'torch,compiled',
                  '--compile': 'eager,default'}
    cases = [(model_options, {'peers': True}), (op_options, {'op': True}),
             (op_options, {'op': True, 'in_process': True})]
    for options, flags in cases:
        argv = [a for item in options.items() for a in item] + ['--model-kwargs', 'channels=16']
        argv += ['--' + flag.replace('_', '-') for flag in flags]
        configs = bench._configs(bench.build_parser().parse_args(argv))
        assert configs == _expected_configs(options, **flags)
    # 2 dtypes x 2 batches x 2 resolutions x (infer: 12 internimage_t + 3 resnet18 + 9 peers; train: 8 + 2 + 6)
    assert len(_expected_configs(model_options, peers=True)) == 8 * (24 + 16)


def test_each_measurement_reads_the_clock_it_is_given():
    import time

    import torch
    from timm_internimage.tools import benchmarking as measure
    cpu = torch.device('cpu')
    readings = iter([0.0, 0.25, 1.0, 1.5])
    assert measure.time_it(lambda: None, cpu, 0, 2, lambda: next(readings)) == [0.25, 0.5]
    # a sleep costs wall time, not CPU time; a CPU-clock measurement first leaves the next one's clock alone
    asleep = measure.time_it(lambda: time.sleep(0.05), cpu, 0, 1, measure.CLOCKS['cpu'])
    awake = measure.time_it(lambda: time.sleep(0.05), cpu, 0, 1, measure.CLOCKS['wall'])
    assert asleep[0] < 0.03 and awake[0] >= 0.05


def test_in_process_configurations_leave_the_process_settings_as_they_were(monkeypatch):
    import torch
    import torch._inductor.config as inductor_config
    bench = _load_benchmark()
    freezing_at_compile = []

    def compile_eagerly(model, **kwargs):  # stands in for inductor: notes the flag when the model compiles
        def compiled(*args):
            freezing_at_compile.append(inductor_config.freezing)
            return model(*args)
        return compiled

    monkeypatch.setattr(torch, 'compile', compile_eagerly)
    import timm_internimage
    threads = torch.get_num_threads()
    seen = []
    monkeypatch.setattr(bench, 'run_model_config', lambda cfg, run=bench.run_model_config: (
        seen.append((timm_internimage.get_backend(), timm_internimage.fused_linear_enabled())), run(cfg))[1])
    timm_internimage.set_backend('reference')
    args = bench.build_parser().parse_args([
        '--in-process', '--device', 'cpu', '--batch-size', '1', '--img-size', '32', '--backend', 'torch',
        '--compile', 'default,freezing', '--fused-linear', 'off', '--warmup', '0', '--iters', '1', '--clock', 'cpu',
        '--threads', str(threads + 1), '--model-kwargs', 'channels=16', 'depths=[1,1,1,1]'])
    for before in (False, True):
        # inductor's own patch: monkeypatch's undo deletes the option from torch's config module
        with inductor_config.patch(freezing=before):
            freezing_at_compile.clear()
            results = [bench._run_in_process(cfg) for cfg in bench._configs(args)]
            assert [r['config']['compile'] for r in results] == ['default', 'freezing']
            assert all('error' not in r for r in results), results
            assert freezing_at_compile == [False, True]  # each configuration's own flag while it runs
            assert inductor_config.freezing is before and torch.get_num_threads() == threads
            assert timm_internimage.get_backend() == 'reference' and timm_internimage.fused_linear_enabled()
    assert seen == [('torch', False)] * 4  # each configuration ran under its own settings


def test_model_macs_counts_a_dcnv3_layer_by_hand():
    """Every multiply-add of one DCNv3 layer, counted by hand: the four linear layers, the depthwise 3x3
    convolution and 5 per output value and kernel point for the sampling (4 corners and the point weight)."""
    from timm_internimage.ops import DCNv3
    from timm_internimage.tools.benchmarking import model_macs
    channels, group, points, pixels = 8, 2, 9, 5 * 6
    layer = DCNv3(channels, kernel_size=3, group=group).eval()
    macs = model_macs(layer, torch.randn(1, 5, 6, channels))
    per_pixel = 2 * channels * channels + channels * group * points * 3 + 9 * channels
    assert macs == {'dense': pixels * per_pixel, 'sampling': 5 * pixels * points * channels,
                    'total': pixels * per_pixel + 5 * pixels * points * channels}


def test_model_macs_of_internimage_t_match_the_published_5g():
    import timm
    from timm_internimage.tools.benchmarking import model_macs
    macs = model_macs(timm.create_model('internimage_t').eval(), torch.zeros(1, 3, 224, 224))
    assert round(macs['total'] / 1e9) == 5  # the published FLOPs (multiply-adds), rounded to 1G as published


def test_benchmark_macs_json():
    doc = _run('--macs', '--model', 'internimage_t,flash_internimage_t', '--img-size', '32,64',
               '--model-kwargs', 'channels=16', 'depths=[1,1,1,1]')
    rows = doc['results']
    assert [(r['model'], r['img_size']) for r in rows] == [
        ('internimage_t', 32), ('internimage_t', 64), ('flash_internimage_t', 32), ('flash_internimage_t', 64)]
    for small, large in (rows[:2], rows[2:]):
        assert small['params_m'] == large['params_m'] > 0
        assert small['sampling_gmacs'] * 4 == pytest.approx(large['sampling_gmacs'])  # 4x the pixels
        assert small['total_gmacs'] == pytest.approx(small['dense_gmacs'] + small['sampling_gmacs'])
