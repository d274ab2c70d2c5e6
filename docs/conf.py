"""
Sphinx configuration for broadcaster's reference: ``sphinx-build -W docs
docs/_build`` (the test suite runs it, so a broken reference fails).
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

from broadcaster import __version__  # noqa: E402

project = "broadcaster"
author = "the broadcaster developers"
release = version = __version__
extensions = ["sphinx.ext.autodoc"]
autodoc_mock_imports = []
# Module docstrings are the single source of what they say: the reference
# pages pull them in with automodule.
autodoc_default_options = {"members": False}
exclude_patterns = ["_build"]
html_theme = "alabaster"
# Cross-references to modules, classes and functions the reference does not
# document (Twisted's, Autobahn's, our own private ones) are not errors.
nitpicky = False
