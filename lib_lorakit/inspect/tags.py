"""Caption tags as they are meant, before anything counts them.

Booru captions write ``blue_hair`` where others write ``blue hair``; prompts copied into
captions carry the WebUI's emphasis syntax — ``(smile:1.2)``, ``((smile))``, ``[smile]`` —
which a trainer reads as literal text; tags that contain real parentheses are escaped,
``hatsune miku \\(cosplay\\)``. All of these name one tag. :func:`normalise_tag` gives the
form the inspector counts (lower case, spaces, literal parentheses); :func:`emphasis_in`
says when a caption tag carries emphasis syntax.
"""

from __future__ import annotations

import functools
import re

_WEIGHT = re.compile(r":\s*-?\d+(?:\.\d+)?\s*$")
# an unescaped bracket: ( ) [ ] not preceded by a backslash
_BRACKET = re.compile(r"(?<!\\)[()\[\]]")
# kaomoji and emoticons keep their underscores (^_^, o_o, >_<): no letter run of 2+ on both sides
_EMOTICON = re.compile(r"^[\W_a-z0-9]{1,3}_[\W_a-z0-9]{1,3}$", re.I)


# pure functions of a string, called for every tag of every file: remembered (tags repeat across files)
@functools.lru_cache(maxsize=1 << 16)
def emphasis_in(tag: str) -> bool:
    """True when ``tag`` carries prompt emphasis: unescaped brackets or a ``:weight``."""
    t = tag.strip()
    return bool(_BRACKET.search(t))


@functools.lru_cache(maxsize=1 << 16)
def normalise_tag(tag: str) -> str:
    """The tag as counted: emphasis brackets and weights dropped, escapes undone, underscores as
    spaces (emoticons such as ``^_^`` kept), lower case, single spaces.

    >>> normalise_tag("(Blue_Hair:1.2)"), normalise_tag(r"miku \\(cosplay\\)"), normalise_tag("[[smile]]")
    ('blue hair', 'miku (cosplay)', 'smile')
    """
    t = tag.strip()
    if _BRACKET.search(t):
        inner = _BRACKET.sub("", t)
        t = _WEIGHT.sub("", inner) if ":" in inner else inner
    t = t.replace("\\(", "(").replace("\\)", ")").replace("\\[", "[").replace("\\]", "]")
    if "_" in t and not _EMOTICON.match(t):
        t = t.replace("_", " ")
    return " ".join(t.lower().split())
