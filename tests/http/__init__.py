"""Tests of :mod:`broadcaster.http`."""
