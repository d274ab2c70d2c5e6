"""Tests of :mod:`broadcaster.clients`."""
