"""What cuts a listing pass short, page by page: a page read again at another offset, and more
items than the largest total stated; never a gap re-read at its own offset, an empty page, or
a total that grows while the pass runs."""

from __future__ import annotations

from exporter.listing import ListingCut, PassPages


def take(pages: PassPages, offset: int, ids: list[str], total: int | None) -> ListingCut | None:
    return pages.take(offset, ids, ids, total)


def test_a_page_with_the_items_of_one_read_at_another_offset_is_a_repeat_in_any_order() -> None:
    pages = PassPages()
    assert take(pages, 0, ["a", "b", "c"], None) is None
    assert take(pages, 3, ["c", "a", "b"], None) is ListingCut.REPEATED_PAGE


def test_a_page_read_again_at_its_own_offset_or_overlapping_another_is_no_repeat() -> None:
    pages = PassPages()
    assert take(pages, 900, ["x", "y"], 1000) is None
    # A gap filled: the same offset read again.
    assert take(pages, 900, ["x", "y"], 1000) is None
    # Pages that overlap but are not the same.
    assert take(pages, 899, ["w", "x"], 1000) is None
    assert take(pages, 901, ["y"], 1000) is None


def test_empty_pages_are_never_a_repeat() -> None:
    pages = PassPages()
    assert take(pages, 0, [], None) is None
    assert take(pages, 100, [], None) is None


def test_items_past_the_largest_total_stated_cut_the_pass() -> None:
    pages = PassPages()
    assert take(pages, 0, ["a", "b"], 3) is None
    # The total grew while the pass ran: the larger one counts, a page without one keeps it.
    assert take(pages, 2, ["c", "d"], 4) is None
    assert take(pages, 4, [], None) is None
    assert (pages.counted, pages.total) == (4, 4)
    assert take(pages, 4, ["e"], 2) is ListingCut.OVER_TOTAL


def test_what_counts_against_the_total_is_counted_once() -> None:
    pages = PassPages()
    # Two rows of one image, then the same image again on a page that shifted.
    assert pages.take(0, ["r1", "r2"], [("trainer", "v1"), ("trainer", "v1")], 1) is None
    assert pages.take(2, ["r3"], [("trainer", "v1")], 1) is None
    assert pages.take(3, ["r4"], [("eval", "v1")], 1) is ListingCut.OVER_TOTAL
