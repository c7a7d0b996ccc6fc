"""Compiled kernels (Cython). Use the validating wrappers in :mod:`tep.kernels` instead."""
