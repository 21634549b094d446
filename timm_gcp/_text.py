"""Wording shared by every layer's messages."""
from typing import Iterable

__all__ = ['preview']


def preview(items: Iterable, limit: int = 5) -> str:
    """The first `limit` items, comma-separated, and how many more there are: 'a, b, c … and 9 more'."""
    items = [str(item) for item in items]
    shown = ', '.join(items[:limit])
    return f'{shown} … and {len(items) - limit} more' if len(items) > limit else shown
