"""Tests of :mod:`broadcaster.redis`."""
