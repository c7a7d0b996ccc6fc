"""Backends that ship with tep. Import the one you need; this package imports nothing
heavy itself.

- ``tep.backends.toy:ToyBackend``: a deterministic numpy model, the default of
  ``tep serve`` and ``quart --app tep run``.
"""
