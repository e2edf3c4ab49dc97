"""The live dashboard's page, script and style, served by scaler.api at ``/``.

No build step: plain HTML, CSS and one script, plus uPlot (a small time-series chart library)
vendored from the npm registry: ``uPlot.iife.min.js`` and ``uPlot.min.css`` are uplot@1.6.32's
``dist/`` files, unchanged, MIT licence in ``uPlot.LICENSE``.
"""
