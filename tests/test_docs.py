"""
The reference in ``docs/`` builds without a warning: a broken reference, a
page missing from the table of contents, or a module docstring that is not
valid reStructuredText fails here, as ``sphinx-build -W`` would.
"""

from __future__ import annotations

import importlib.util
import os
import re

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests.support import REPO_ROOT, run_module


class ReferenceTests(SynchronousTestCase):
    def test_every_module_is_in_the_reference(self):
        """docs/reference.rst pulls in every module of the package."""
        with open(os.path.join(REPO_ROOT, "docs", "reference.rst"), encoding="utf-8") as page:
            reference = page.read()
        for folder, _, files in os.walk(os.path.join(REPO_ROOT, "broadcaster")):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.relpath(os.path.join(folder, name), REPO_ROOT)
                    module = path[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    self.assertIn(".. automodule:: {}\n".format(module), reference)


    def test_every_option_is_documented(self):
        """docs/options.rst names every flag of twistd broadcaster (but
        --help and --version, which every Twisted command has)."""
        from broadcaster.service.options import Options

        with open(os.path.join(REPO_ROOT, "docs", "options.rst"), encoding="utf-8") as page:
            options = page.read()
        flags = {name.rstrip("=") for name in Options().longOpt} - {"help", "version"}
        undocumented = [
            flag for flag in flags if not re.search(r"``--{}(?![\w-])".format(re.escape(flag)), options)
        ]
        self.assertEqual(sorted(undocumented), [])


class DocsTests(TestCase):
    timeout = 300

    @inlineCallbacks
    def test_the_reference_builds_without_warnings(self):
        """sphinx-build -W builds docs/ into HTML, every module's docstring included."""
        if importlib.util.find_spec("sphinx") is None:
            message = "Sphinx is not installed (pip install '.[test]')"
            if os.environ.get("CI"):
                self.fail(message)
            raise SkipTest(message)
        out = os.path.abspath(self.mktemp())
        process = run_module(
            self,
            "sphinx",
            ["-W", "--keep-going", "-q", "-b", "html", os.path.join(REPO_ROOT, "docs"), out],
        )
        stdout, stderr, status = yield process.ended()
        self.assertEqual(status, 0, "sphinx-build -W failed:\n{}\n{}".format(stdout, stderr))
        with open(os.path.join(out, "reference.html"), encoding="utf-8") as page:
            reference = page.read()
        # The module docstrings are the reference's single source.
        self.assertIn("The fan-out engine", reference)
        self.assertIn("One admission policy for every listener", reference)
        with open(os.path.join(out, "options.html"), encoding="utf-8") as page:
            self.assertIn("--max-buffer", page.read())
