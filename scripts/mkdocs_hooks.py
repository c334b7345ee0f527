"""MkDocs hooks (see mkdocs.yml): the docstrings use Sphinx roles (:class:`X`), which
Markdown renders as ":class:" followed by code; the site shows the code alone."""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|meth|func|attr|exc|data|mod|obj):(<code>)")


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub(r"\1", html)
