"""A griffe extension for the API pages: the docstrings use Sphinx roles
(:func:`resolve`, :class:`~tilerseg.io.Reader`), which Markdown would show
as literal text; here each becomes a code span naming its target."""
from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|data|attr|obj|exc|const):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
