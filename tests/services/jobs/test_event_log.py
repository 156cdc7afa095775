"""The event log's contract with its subscribers, on its own."""

import asyncio

from app.services.jobs.domain import JobEvent
from app.services.jobs.event_log import EventLog


def _event(number: int, name: str = "progress") -> JobEvent:
    return JobEvent(id=number, name=name, data="{}")


def test_a_subscriber_gets_all_that_has_come_in_one_batch_and_nothing_twice():
    async def scenario():
        log = EventLog()
        for number in (1, 2, 3):
            log.add(_event(number))
        batches = log.follow(after_id=1, keepalive_seconds=5)
        assert [event.id for event in await anext(batches)] == [2, 3]  # a burst is one batch
        waiting = asyncio.ensure_future(anext(batches))
        await asyncio.sleep(0)  # let it reach its wait
        log.add(_event(4))
        log.add(_event(5, "done"))  # the last event closes the log
        assert [event.id for event in await waiting] == [4, 5]
        assert [batch async for batch in batches] == []  # closed: the stream ends

    asyncio.run(scenario())


def test_events_that_come_while_a_batch_is_out_are_sent_before_the_end():
    async def scenario():
        log = EventLog()
        log.add(_event(1))
        batches = log.follow(after_id=0, keepalive_seconds=5)
        assert [event.id for event in await anext(batches)] == [1]
        log.add(_event(2, "done"))  # while the subscriber is still writing batch 1
        assert [[event.id for event in batch] async for batch in batches] == [[2]]

    asyncio.run(scenario())


def test_a_quiet_log_yields_a_keepalive():
    async def scenario():
        batches = EventLog().follow(after_id=0, keepalive_seconds=0.01)
        assert await anext(batches) is None

    asyncio.run(scenario())


def test_events_that_come_early_wait_for_the_gap_and_repeats_are_ignored():
    async def scenario():
        log = EventLog()
        log.add(_event(3))
        log.add(_event(2))
        assert len(log) == 0  # 1 has not come: nothing can be followed yet
        log.add(_event(1))
        log.add(_event(2))
        log.add(_event(4, "done"))
        log.add(_event(5))  # after the end: ignored
        assert [[event.id for event in batch] async for batch in log.follow(0, 5)] == [[1, 2, 3, 4]]

    asyncio.run(scenario())
