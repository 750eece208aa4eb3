"""The sender's shared-memory arena: allocation, coalescing, and what a collector maps."""

import mmap

import pytest

from routing_replay.wire import shm

PAGE = mmap.PAGESIZE


@pytest.fixture
def arena():
    a = shm.Arena(16 * PAGE)
    yield a
    a.close()


def test_regions_are_page_aligned_first_fit_and_coalesce(arena):
    a = arena.alloc(1)
    b = arena.alloc(PAGE + 1)
    c = arena.alloc(3 * PAGE)
    assert (a, b, c) == (0, PAGE, 3 * PAGE)
    assert arena.used_bytes == 6 * PAGE
    arena.free(b)
    assert arena.alloc(2 * PAGE) == PAGE  # the hole is reused
    arena.free(PAGE)
    arena.free(a)
    arena.free(c)
    assert arena.used_bytes == 0
    assert arena.alloc(16 * PAGE) == 0  # everything merged back into one extent


def test_full_arena_says_so(arena):
    assert arena.alloc(16 * PAGE) == 0
    assert arena.alloc(1) is None


def test_collector_views_see_what_the_sender_wrote(arena):
    offset = arena.alloc(10)
    arena.write(offset, memoryview(b"hello"), memoryview(b"world"))
    views = shm.ArenaViews()
    assert bytes(views.view(arena.name, offset, 10)) == b"helloworld"
    with pytest.raises(ValueError, match="outside arena"):
        views.view(arena.name, 15 * PAGE, 2 * PAGE)


def test_names_outside_our_prefix_are_refused():
    with pytest.raises(ValueError, match="not a routing-replay shared-memory name"):
        shm.ArenaViews().view("../etc/passwd", 0, 1)
    assert shm.read_probe("../../etc/passwd") is None
