"""Tests of :mod:`broadcaster.service`."""
