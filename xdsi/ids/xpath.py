"""Bounded evaluation of request XPath expressions on a PS3.19 Native DICOM Model tree.

An expression comes from the network, so before lxml sees it:

* its length and the number per document are capped;
* no extension functions exist (lxml's EXSLT regular expressions are off,
  no namespaces are bound, so no prefixed function can be called);
* inside a predicate, only local steps are allowed: no absolute path, no
  ``//`` and no descendant/ancestor/following/preceding axes and no ``id()``.
  Nested predicates that each rescan the whole tree are what makes XPath 1.0
  polynomial in the document size; with this rule every predicate looks at
  the context node's own neighbourhood, so evaluation stays roughly linear in
  the (already capped) tree size;
* the serialised result is capped.

The tree is the namespace-free form of the model so that PS3.19's own
examples (``/NativeDicomModel/DicomAttribute[@keyword="..."]``) match as
written; results are returned re-namespaced into the Native DICOM namespace.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from lxml import etree

from xdsi.standards.constants import NS_NATIVE_DICOM

MAX_EXPRESSION_LENGTH = 1024
MAX_EXPRESSIONS = 64
MAX_TREE_NODES = 200_000
MAX_RESULT_BYTES = 1024 * 1024
_FORBIDDEN_IN_PREDICATE = re.compile(r"\b(descendant|descendant-or-self|ancestor|ancestor-or-self|following|following-sibling|preceding|preceding-sibling)\s*::|\bid\s*\(")


class XPathRefused(ValueError):
    """The expression is malformed or outside the bounds above; the message says which."""


class ResultTooLarge(ValueError):
    """The result of a valid expression exceeds :data:`MAX_RESULT_BYTES`."""


def _strip_literals(expr: str) -> str:
    out = []
    quote = None
    for ch in expr:
        if quote:
            if ch == quote:
                quote = None
            out.append(" ")
        elif ch in "'\"":
            quote = ch
            out.append(" ")
        else:
            out.append(ch)
    if quote:
        raise XPathRefused("unterminated string literal")
    return "".join(out)


def check(expr: str, max_length: int = MAX_EXPRESSION_LENGTH) -> str:
    """Raise :class:`XPathRefused` unless ``expr`` is within bounds; returns it stripped.

    A first filter only: it refuses the obvious whole-tree rescans cheaply,
    but the time budget of :mod:`xdsi.ids.xpath_pool` is what bounds cost.
    """
    expr = expr.strip()
    if not expr:
        raise XPathRefused("empty XPath expression")
    if len(expr) > max_length:
        raise XPathRefused(f"XPath expression longer than {max_length} characters")
    bare = _strip_literals(expr)
    depth = 0
    prev = ""
    segments: list[list[str]] = [[]]
    for ch in bare:
        if ch == "[":
            depth += 1
            segments.append([])
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise XPathRefused("unbalanced ']'")
            inner = "".join(segments.pop())
            _check_predicate(inner, nested=depth > 0)
        elif depth > 0:
            segments[-1].append(ch)
        prev = ch
    if depth:
        raise XPathRefused("unbalanced '['")
    del prev
    try:
        etree.XPath(expr, regexp=False, smart_strings=False)
    except (etree.XPathSyntaxError, ValueError) as exc:  # ValueError: NUL or control characters, which lxml refuses
        raise XPathRefused(f"not a valid XPath 1.0 expression: {exc}") from None
    return expr


def _is_operator_star(before: str) -> bool:
    """Whether a ``*`` that ``before`` precedes is the multiply operator (XPath 1.0 section 3.7), not a name test."""
    before = before.rstrip()
    if not before or re.search(r"(::|[@(\[,/|+=<>!-]|\b(and|or|div|mod))$", before):
        return False
    if before[-1] == "*":  # after a name-test star it multiplies, after a multiply star it is a name test
        return not _is_operator_star(before[:-1])
    return before[-1].isalnum() or before[-1] in "_.)]"


def _check_predicate(inner: str, nested: bool = False) -> None:
    if nested and (".." in inner or re.search(r"\bparent\s*::", inner)):
        raise XPathRefused("parent steps are not allowed inside a nested predicate")
    if "//" in inner:
        raise XPathRefused("'//' is not allowed inside a predicate")
    if _FORBIDDEN_IN_PREDICATE.search(inner):
        raise XPathRefused("descendant, ancestor, following and preceding axes and id() are not allowed inside a predicate")
    # an absolute path: '/' where a step starts (not after a name, ')', ']', '.', '*' or '@...')
    for m in re.finditer(r"/", inner):
        before = inner[: m.start()].rstrip()
        if not before or before[-1] in "([,=<>!|+-" or re.search(r"\b(and|or|div|mod)$", before) or (before[-1] == "*" and _is_operator_star(before[:-1])):
            raise XPathRefused("absolute paths are not allowed inside a predicate")


@dataclass
class XPathResult:
    """Text (strings, numbers, booleans, attribute and text nodes) and element copies, in document order."""

    text: str
    elements: list[Any]


def _renamespace(el: Any) -> Any:
    out = copy.deepcopy(el)
    for e in out.iter():
        if isinstance(e.tag, str) and not e.tag.startswith("{"):
            e.tag = f"{{{NS_NATIVE_DICOM}}}{e.tag}"
    etree.cleanup_namespaces(out, top_nsmap={None: NS_NATIVE_DICOM})
    return out


def _number(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "Infinity" if v > 0 else "-Infinity"
    return str(int(v)) if v == int(v) else repr(v)


def evaluate(tree: Any, expr: str, max_bytes: int = MAX_RESULT_BYTES, *, guard: bool = True) -> XPathResult:
    """Evaluate an expression on a namespace-free Native DICOM Model tree.

    In-process, this is unbounded in time: the server calls it only inside an
    :mod:`xdsi.ids.xpath_pool` worker, which is killed at its deadline (there
    ``guard=False``: the caller ran :func:`check` with its own limits, and the
    budget must hold even for what the static guard lets through).
    """
    MAX_RESULT_BYTES = max_bytes  # noqa: N806  (the messages below name the cap in force)
    expr = check(expr) if guard else expr.strip()
    n = sum(1 for _ in tree.iter())
    if n > MAX_TREE_NODES:
        raise ResultTooLarge(f"the dataset has {n} XML nodes, more than {MAX_TREE_NODES}")
    try:
        value = etree.XPath(expr, regexp=False, smart_strings=False)(tree)
    except etree.XPathEvalError as exc:
        raise XPathRefused(f"cannot evaluate: {exc}") from None
    if isinstance(value, bool):
        return XPathResult("true" if value else "false", [])
    if isinstance(value, float):
        return XPathResult(_number(value), [])
    if isinstance(value, (str, bytes)):
        text = value.decode() if isinstance(value, bytes) else value
        if len(text.encode()) > MAX_RESULT_BYTES:
            raise ResultTooLarge(f"the result is larger than {MAX_RESULT_BYTES} bytes")
        return XPathResult(text, [])
    texts: list[str] = []
    elements: list[Any] = []
    size = 0
    for item in value:
        if isinstance(item, etree._Element):
            if not isinstance(item.tag, str):
                continue
            size += len(etree.tostring(item))
            elements.append(item)
        else:  # attribute values and text nodes
            s = str(item)
            size += len(s.encode())
            texts.append(s)
        if size > MAX_RESULT_BYTES:
            raise ResultTooLarge(f"the result is larger than {MAX_RESULT_BYTES} bytes")
    return XPathResult("\\".join(texts), [_renamespace(e) for e in elements])
