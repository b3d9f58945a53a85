"""The benchmark suite: how fast is this commit, will it fit the challenge's budgets, did anything get slower?

- :mod:`pgolf.bench.core`: the :class:`~pgolf.bench.core.Case` type of the per-op benchmark modules
  (``pgolf/bench/ops/<op>.py``) and how one case is timed.
- :mod:`pgolf.bench.kernels`, :mod:`pgolf.bench.step`, :mod:`pgolf.bench.evalbench`: the three benchmarks.
- :mod:`pgolf.bench.history`, :mod:`pgolf.bench.check`: the run history and the regression check.
- :mod:`pgolf.bench.gpucheck`, :mod:`pgolf.bench.plot`, :mod:`pgolf.bench.readme`: ``make gpu-check``, charts,
  README's Performance section.
- :mod:`pgolf.bench.cli`: the ``pgolf-bench`` command (``python -m pgolf.bench``).
"""
