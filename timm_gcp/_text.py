"""Wording shared by every layer's messages, and the one check of text that is published."""
from typing import Iterable, Optional

__all__ = ['preview', 'first_not_utf8']


def preview(items: Iterable, limit: int = 5) -> str:
    """The first `limit` items, comma-separated, and how many more there are: 'a, b, c … and 9 more'."""
    items = [str(item) for item in items]
    shown = ', '.join(items[:limit])
    return f'{shown} … and {len(items) - limit} more' if len(items) > limit else shown


def first_not_utf8(texts: Iterable[str]) -> Optional[str]:
    """The first of `texts` that is not valid UTF-8 text, else None: a file name in another encoding reaches Python
    (os.fsdecode) with lone surrogates, 'dais\\udcff' for b'dais\\xff'."""
    for text in texts:
        try:
            text.encode('utf-8')
        except UnicodeEncodeError:
            return text
    return None
