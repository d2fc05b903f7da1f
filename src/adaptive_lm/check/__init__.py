"""The GPU self-check (``adaptive-lm check``): does adaptive-lm work, and work well, on this machine's GPU?

``run.main(CheckConfig(...))`` runs the checks and returns an ``Outcome`` (records, report text, the JSON written);
the checks live by subject in ``environment``, ``kernels``, ``model``, ``trainer``, ``distributed``, ``recipe`` and
``inference``, over the shared ``context`` (sizes, device, generated data, the recipe's trainer). Nothing here
prints: progress goes to the ``adaptive_lm.check`` log and the command line shows the report.
"""
