"""Scaling-law sweeps: plan → submit (Slurm job array or local) → collect → fit → plot.

Entry point: ``python -m pretrain.sweep`` (see ``__main__``). The fit lives in ``fit`` and needs only
numpy/scipy; ``collect``/``plot`` use pandas/matplotlib.
"""
