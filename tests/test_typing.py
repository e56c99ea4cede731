"""
swapproxy's annotations hold: mypy in strict mode, with the zope.interface plugin, finds nothing
in swapproxy/ (the settings are the ``[mypy]`` sections of setup.cfg).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

ROOT = Path(__file__).resolve().parent.parent


class StrictTypingTests(TestCase):
    """
    The type checker, run on the package as a contributor runs it.
    """

    def test_mypy_strict_is_clean(self) -> None:
        """
        ``mypy`` (strict, mypy-zope) reports no error in swapproxy/. A missing mypy is a failure:
        it comes with ``pip install -e '.[test]'``.
        """
        result = subprocess.run(
            [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "setup.cfg"), "--no-incremental"],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
        report = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, f"mypy --strict found problems:\n{report}")
        self.assertIn("Success: no issues found", report)
        # The plugin was loaded: the interfaces are checked, not treated as Any.
        self.assertIn("mypy_zope:plugin", (ROOT / "setup.cfg").read_text())
