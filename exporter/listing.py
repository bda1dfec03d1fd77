"""Why a listing pass (of images, of builds) may stop short of the listing's end
(``ListingCut``), and what its pages tell of it (``PassPages``): whether they move on, and
whether they hold more than the total they state. The page cap is each listing's own
``max_pages``.

What a cut pass read is no complete view of the listing: the last complete one must not be
replaced by it.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable


class ListingCut(enum.StrEnum):
    """Why a listing pass stopped before its end; the values are ``reason`` label values of
    ``image_list_last_error`` and ``build_list_last_error``, beside the request outcomes."""

    # The pass read its ``max_pages`` and the listing went on.
    TRUNCATED = "truncated"
    # A page held the same items as a page read at another offset of the same pass: the API
    # (or a proxy before it) ignores ``offset``, and every further page would be that one again.
    REPEATED_PAGE = "repeated_page"
    # The pass holds more items than the largest total any of its pages stated.
    OVER_TOTAL = "over_total"


class PassPages:
    """The pages one pass read so far, as far as a cut is concerned.

    A page is remembered by a hash of its items' IDs: 400 pages of 250 images must not keep a
    second copy of every ID. What counts against the total is kept, to be counted once: pages
    that shift while the pass runs (items added or gone) repeat some items, but a consistent
    API never makes the distinct ones more than the largest total it stated.
    """

    def __init__(self) -> None:
        # The offset each page's items were first read at, by the hash of their IDs.
        self._pages: dict[tuple[int, int], int] = {}
        self._counted: set[Hashable] = set()
        self._total: int | None = None

    def take(
        self,
        offset: int,
        ids: Iterable[str],
        counted: Iterable[Hashable],
        total: int | None,
    ) -> ListingCut | None:
        """One page read at ``offset``: the IDs of its items, what of them counts against the
        total (for builds their IDs; for images their name and tag), and the total it states.
        Returns the cut the pass must stop with, or None to go on.

        Reading the same offset twice (a pass filling a gap it left) is no repeat.
        """
        page = frozenset(ids)
        if page:
            first = self._pages.setdefault((len(page), hash(page)), offset)
            if first != offset:
                return ListingCut.REPEATED_PAGE
        self._counted.update(counted)
        if total is not None and (self._total is None or total > self._total):
            # The largest total: builds or images added while the pass runs raise it.
            self._total = total
        if self._total is not None and len(self._counted) > self._total:
            return ListingCut.OVER_TOTAL
        return None

    @property
    def counted(self) -> int:
        return len(self._counted)

    @property
    def total(self) -> int | None:
        """The largest total the pass's pages stated, if any did."""
        return self._total
