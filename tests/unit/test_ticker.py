"""The links' periodic walk (heartbeats, keep-alives, stall checks) is sliced:
at most SLICE links per loop pass, so that a node with tens of thousands of
connections never holds its loop for the whole walk."""

from __future__ import annotations

import asyncio

from gateway.transports.ticker import SLICE, Ticker

N = 3 * SLICE + 10


class Link:
    pass


async def test_a_walk_visits_every_link_once_a_slice_per_loop_pass() -> None:
    links = {Link() for _ in range(N)}
    visits: list[Link] = []
    ticker = Ticker(0.05, links, lambda link, now: visits.append(link))
    ticker.start()
    seen: list[int] = []  # visits so far, as other callbacks of the loop saw them
    async with asyncio.timeout(5):
        while len(visits) < N:
            seen.append(len(visits))
            await asyncio.sleep(0)
    steps = [b - a for a, b in zip(seen, [*seen[1:], len(visits)], strict=True)]
    assert max(steps) <= SLICE, f"{max(steps)} links visited in one loop pass"
    assert len(visits) == N and set(visits) == links


async def test_links_gone_since_the_walk_began_are_not_visited() -> None:
    links = {Link() for _ in range(N)}
    visits: list[Link] = []
    gone = set(list(links)[: SLICE * 2])

    def visit(link: Link, now: float) -> None:
        visits.append(link)
        if len(visits) == 1:
            links.difference_update(gone - {link})  # closed while the walk is under way

    ticker = Ticker(1.0, links, visit)
    ticker._tick()  # the walk, now
    async with asyncio.timeout(5):
        while len(visits) < len(links):
            await asyncio.sleep(0)
    assert len(visits) == len(set(visits)) == len(links)
    assert set(visits) == links


async def test_the_ticks_stop_without_links_and_start_again_with_one() -> None:
    links: set[Link] = set()
    visits: list[Link] = []
    ticker = Ticker(0.01, links, lambda link, now: visits.append(link))
    ticker.start()
    await asyncio.sleep(0.05)
    assert visits == []
    link = Link()
    links.add(link)
    ticker.start()
    async with asyncio.timeout(2):
        while len(visits) < 2:
            await asyncio.sleep(0.005)
    assert set(visits) == {link}
