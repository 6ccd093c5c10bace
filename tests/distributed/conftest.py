"""The Ray tests: skipped without Ray. Their one local Ray is the `ray_session` fixture of tests/conftest.py."""

import pytest

ray = pytest.importorskip("ray")
