"""Plugins that run SAT inside other training frameworks (:mod:`.axolotl`).

Nothing is imported here: the engine and ``sat-train`` never load this package, and each module
imports its framework only when the framework itself loads the plugin.
"""
