"""Tests of :mod:`broadcaster.protocols`."""
