"""Library functions behind the command line, one module per tool: ``loading`` (devices, models, checkpoints),
``images``, ``predict``, ``validate``, ``convert``, ``export``, ``tags`` (the tag table, the manifest refresh) and
``benchmarking`` (the measurement helpers of the benchmarks and the GPU check).

They raise :class:`~timm_internimage.tools.loading.UsageError` (or a weights / export error) for an input they
cannot use; the command line (:mod:`timm_internimage.cli`) only parses arguments, prints, and maps these errors
to exit codes.
"""
