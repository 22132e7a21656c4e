"""The ``sat-train`` application: scenario YAML, run folders, data, builtin models, reports.

Imports go one way: ``sat_trainer.app`` -> :class:`sat_trainer.SATCallback` -> the engine
(``config``, ``schedule``, ``importance``, ``selection``, ``ops``, ``adapters``, ``calibration``,
``patch/``, ``errors``, ``yaml_io`` in ``sat_trainer/``). No engine module imports this package:
a Trainer user who writes ``from sat_trainer import SATConfig, SATCallback`` never loads it.

Nothing is imported here, so that ``sat-train`` (:mod:`.cli`) can reject a bad config before
torch and transformers are imported.
"""
