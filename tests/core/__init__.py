"""Tests of :mod:`broadcaster.core`."""
