"""Benchmarks of the stack, runnable with ``python -m bench [names...]`` (or ``make bench``).

Each benchmark is a module with ``NAME``, ``TITLE``, ``run(ctx) -> Result`` (measures and returns
raw samples plus summaries), ``render(result) -> str`` (its Markdown section) and
``plot(result, img_dir) -> list[Path]`` (its PNGs). ``bench.registry`` lists them; the runner saves
each Result to bench/results/<name>.json and ``bench.report`` turns the saved results into
docs/benchmarks.md. Figures are compared side by side in one run, as medians and ratios: nothing
here is a pass/fail timing test.
"""
