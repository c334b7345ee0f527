"""MkDocs hooks (see mkdocs.yml). The docstrings use two reST habits that Markdown renders
literally: roles (:class:`X` shows as ":class:" then code: the site shows the code alone) and
"::" ending the paragraph before an example (the site shows one colon)."""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|meth|func|attr|exc|data|mod|obj):(<code>)")


_LITERAL = re.compile(r"::</p>")


def on_page_content(html: str, **kwargs: Any) -> str:
    return _LITERAL.sub(":</p>", _ROLE.sub(r"\1", html))
