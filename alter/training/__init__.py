"""The unlearning trainer, one concern per module:

- :mod:`~alter.training.loop`: :func:`unlearn` and its loop;
- :mod:`~alter.training.args`: ``UnlearnArgs``, the validated arguments of a run;
- :mod:`~alter.training.schedule`: run length and the early stop's scores;
- :mod:`~alter.training.checkpoint`: checkpoints, RNG state, the saved result;
- :mod:`~alter.training.report`: the run report and routing shares;
- :mod:`~alter.training.distributed`: the multi-process engine;
- :mod:`~alter.training.finetune`: plain next-token training (target models).

Measurements and design rationale: ``docs/training.md``. The package imports nothing
itself, so that :mod:`alter.methods` can read ``UnlearnArgs`` without loading the loop.
"""
