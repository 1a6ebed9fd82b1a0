"""Measurement helpers shared by ``benchmarks/benchmark.py`` and ``scripts/gpu_check.py``.

Timing with an explicit clock, peak memory of a window of work, median summaries, the DCNv3 op timed
forward and backward on the shapes of InternImage-T's four stages (and DCNv4 against it), and a model's
multiply-adds. Nothing here keeps state between calls: each measurement gets its clock and device as arguments.

Peak memory (``PeakMemory``): on CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated when the
window opened. On CPU, the peak resident set size of the process above its size when the window opened: freed
heap memory is handed back to the OS (``malloc_trim``) and the kernel's high-water mark (``VmHWM``) is reset
through ``/proc/self/clear_refs``, so the number covers only the work in the window. Where that reset is not
allowed, the mark covers the whole process and the number is an upper bound (``exact`` is then False).
"""
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # torch has no public import path for it

__all__ = ['CLOCKS', 'Clock', 'OP_SHAPES', 'OpRecorder', 'PeakMemory', 'cpu_name', 'dcnv3_3x3', 'model_macs',
           'op_inputs', 'packed_op_inputs', 'summary', 'synchronize', 'time_dcnv4_against_dcnv3', 'time_it',
           'time_op_shape']

Clock = Callable[[], float]  # seconds, e.g. time.perf_counter

# ``wall``: elapsed time; ``cpu``: CPU time of the process (summed over its threads).
CLOCKS: Dict[str, Clock] = {'wall': time.perf_counter, 'cpu': time.process_time}

# (height = width, channels, groups) of the DCNv3 layers in InternImage-T's four stages at 224 px.
OP_SHAPES: Tuple[Tuple[int, int, int], ...] = ((56, 64, 4), (28, 128, 8), (14, 256, 16), (7, 512, 32))


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_memory() -> None:
    """Give memory freed earlier in the process back to the OS (glibc), so that reusing it counts as new."""
    try:
        import ctypes
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the work done between ``start()`` and ``stop()``, in MiB (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.exact = True
        self.baseline_kib = 0
        self.baseline_bytes = 0

    def start(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            return
        _release_free_memory()
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            self.exact = False
        self.baseline_kib = _proc_status_kib('VmRSS') or 0

    def stop(self) -> Optional[float]:
        """MiB above the level at ``start()``; None where the platform does not report it."""
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.baseline_bytes) / 2 ** 20
        peak = _proc_status_kib('VmHWM')
        if peak is None:
            return None
        return max(peak - self.baseline_kib, 0) / 1024


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform module knows; every reported figure names its CPU."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_it(
        fn: Callable[[], Any],
        device: torch.device,
        warmup: int,
        iters: int,
        clock: Clock,
        after_warmup: Optional[Callable[[], None]] = None,
) -> List[float]:
    """Seconds per call of ``fn``, read on ``clock``, for ``iters`` calls after ``warmup`` untimed ones.

    ``after_warmup`` runs once between the two (e.g. ``PeakMemory.start``).
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    if after_warmup is not None:
        after_warmup()
    times = []
    for _ in range(iters):
        start = clock()
        fn()
        synchronize(device)
        times.append(clock() - start)
    return times


def summary(times: List[float]) -> Dict[str, float]:
    """Median, min and mean in milliseconds of ``times`` (seconds), and their count."""
    return {
        'median_ms': 1e3 * statistics.median(times),
        'min_ms': 1e3 * min(times),
        'mean_ms': 1e3 * statistics.fmean(times),
        'iters': len(times),
    }


def op_inputs(
        batch: int,
        size: int,
        channels: int,
        group: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``(input, offset, mask)`` of a 3x3 DCNv3 on a ``size`` x ``size`` map, channels last, drawn on
    the CPU from ``generator`` (the same values on every device). Offsets are a few pixels, so that some
    sampling points leave the map (the border handling runs); the mask is a softmax over each group's points."""
    points = 9
    x = torch.randn(batch, size, size, channels, generator=generator).to(device, dtype)
    offset = (2 * torch.randn(batch, size, size, group * points * 2, generator=generator)).to(device, dtype)
    mask = torch.randn(batch, size, size, group, points, generator=generator).softmax(-1)
    mask = mask.reshape(batch, size, size, group * points).to(device, dtype)
    return x, offset, mask


def dcnv3_3x3(backend: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """``op(input, offset, mask, group)``: the 3x3, stride 1, padding 1 DCNv3 of InternImage's blocks, on
    ``backend``."""
    from ..ops import dcnv3

    def op(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, group: int) -> torch.Tensor:
        return dcnv3(x, offset, mask, kernel_size=3, stride=1, padding=1, dilation=1, group=group,
                     offset_scale=1.0, backend=backend)
    return op


def time_op_shape(
        op: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor],
        batch: int,
        shape: Tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
        warmup: int,
        iters: int,
        clock: Clock,
) -> Tuple[Dict[str, Any], bool]:
    """Forward (under ``inference_mode``) and backward times of ``op`` on one ``OP_SHAPES`` entry, and peak
    memory of each phase's timed iterations.

    Returns the row (``shape``, ``fwd_ms`` and ``bwd_ms`` medians, full ``fwd``/``bwd`` summaries,
    ``fwd_peak_mem_mib``, ``fwd_bwd_peak_mem_mib``) and whether the peak memory is exact.
    """
    size, channels, group = shape
    x, offset, mask = op_inputs(batch, size, channels, group, dtype, device, torch.Generator().manual_seed(0))
    memory = PeakMemory(device)
    with torch.inference_mode():
        fwd = time_it(lambda: op(x, offset, mask, group), device, warmup, iters, clock, after_warmup=memory.start)
        fwd_peak = memory.stop()

    leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
    grad_out = torch.randn_like(x)
    bwd = []
    memory = PeakMemory(device)
    for i in range(warmup + iters):  # only the backward is timed; the window covers forward and backward
        if i == warmup:
            memory.start()
        out = op(*leaves, group)
        synchronize(device)
        start = clock()
        out.backward(grad_out)
        synchronize(device)
        if i >= warmup:
            bwd.append(clock() - start)
        for leaf in leaves:
            leaf.grad = None
        del out
    train_peak = memory.stop()
    fwd_stats, bwd_stats = summary(fwd), summary(bwd)
    row = {
        'shape': {'N': batch, 'H': size, 'W': size, 'C': channels, 'G': group},
        'fwd_ms': fwd_stats['median_ms'],
        'bwd_ms': bwd_stats['median_ms'],
        'fwd': fwd_stats,
        'bwd': bwd_stats,
        'fwd_peak_mem_mib': fwd_peak,
        'fwd_bwd_peak_mem_mib': train_peak,
    }
    return row, memory.exact


def packed_op_inputs(
        batch: int,
        size: int,
        channels: int,
        group: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input, offset, mask_logits, offset_mask)``: a 3x3 DCNv3 call as InternImage makes it (mask logits, the
    softmax fused into the op) and the DCNv4 call on the same input as FlashInternImage makes it (one packed,
    padded ``offset_mask`` with the same offsets, the softmax of the logits as its weights)."""
    from ..ops.dcn_v4 import offset_mask_channels
    points = 9
    x, offset, _ = op_inputs(batch, size, channels, group, dtype, device, generator)
    logits = torch.randn(batch, size, size, group * points, generator=generator).to(device, dtype)
    weights = logits.unflatten(-1, (group, points)).float().softmax(-1).to(dtype)
    packed = torch.cat([offset.unflatten(-1, (group, 2 * points)), weights], -1).flatten(-2)
    padding = offset_mask_channels(group, points) - packed.shape[-1]
    offset_mask = torch.nn.functional.pad(packed, (0, padding))
    return x, offset, logits, offset_mask


def time_dcnv4_against_dcnv3(
        batch: int,
        shape: Tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
        warmup: int,
        iters: int,
        clock: Clock,
        backend: str = 'compiled',
) -> Dict[str, Dict[str, float]]:
    """Forward (under ``inference_mode``) and backward median milliseconds of the 3x3 DCNv4 op (FlashInternImage's
    call) and the DCNv3 op (InternImage's call, mask logits) on one ``OP_SHAPES`` entry, the two interleaved
    call by call (their order alternating), so that both see the same machine load: ``{'dcnv4': {'fwd_ms',
    'bwd_ms'}, 'dcnv3': {...}}``."""
    from ..ops import Geometry, dcnv3_core, dcnv4_core
    size, channels, group = shape
    x, offset, logits, offset_mask = packed_op_inputs(
        batch, size, channels, group, dtype, device, torch.Generator().manual_seed(0))
    geometry = Geometry(3, 3, 1, 1, 1, 1, 1, 1, group, channels // group, 1.0, False)
    calls = {
        'dcnv4': ((x, offset_mask), lambda a, om: dcnv4_core(a, om, geometry, backend=backend)),
        'dcnv3': ((x, offset, logits),
                  lambda a, off, m: dcnv3_core(a, off, m, geometry, mask_is_logits=True, backend=backend)),
    }
    grad_out = torch.randn_like(x)
    times: Dict[str, Dict[str, List[float]]] = {name: {'fwd': [], 'bwd': []} for name in calls}
    for i in range(warmup + iters):
        for name in (list(calls) if i % 2 else list(calls)[::-1]):
            tensors, op = calls[name]
            with torch.inference_mode():
                synchronize(device)
                start = clock()
                op(*tensors)
                synchronize(device)
                fwd = clock() - start
            leaves = [t.clone().requires_grad_() for t in tensors]
            out = op(*leaves)
            synchronize(device)
            start = clock()
            out.backward(grad_out)
            synchronize(device)
            if i >= warmup:
                times[name]['fwd'].append(fwd)
                times[name]['bwd'].append(clock() - start)
    return {name: {'fwd_ms': 1e3 * statistics.median(t['fwd']), 'bwd_ms': 1e3 * statistics.median(t['bwd'])}
            for name, t in times.items()}


def _sampling_macs(module: torch.nn.Module, output: torch.Tensor) -> int:
    """Multiply-adds of a DCNv3 / DCNv4 layer's sampling: per output value and kernel point, 4 bilinear corners
    and the point weight (the official ``get_flops.py`` count, ``5 * pixels * points * channels``)."""
    points = module.kernel_size * module.kernel_size - int(module.remove_center)
    return 5 * output.shape[:-1].numel() * points * module.group * module.group_channels


def model_macs(model: torch.nn.Module, example: torch.Tensor) -> Dict[str, int]:
    """Multiply-adds of one forward pass of ``model`` on ``example``: ``dense`` (the matrix products and
    convolutions, as ``torch.utils.flop_counter`` counts them, halved), ``sampling`` (the deformable sampling of
    every DCNv3 / DCNv4 layer) and their ``total``. Elementwise work (norms, activations, softmax) is not counted,
    as in the published FLOPs. Runs with the pure-PyTorch op and the plain linear layers, so that every matrix
    product goes through ATen where the counter sees it."""
    from torch.utils.flop_counter import FlopCounterMode
    from .. import backend, fused_linear
    from ..ops import DCNv3, DCNv4
    sampling = 0

    def count_sampling(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal sampling
        sampling += _sampling_macs(module, output)

    hooks = [m.register_forward_hook(count_sampling) for m in model.modules() if isinstance(m, (DCNv3, DCNv4))]
    try:
        with backend('torch'), fused_linear(False), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    dense = counter.get_total_flops() // 2
    return {'dense': dense, 'sampling': sampling, 'total': dense + sampling}


class OpRecorder(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher inside its ``with`` block (``names``), to tell
    which kernels ran."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))
