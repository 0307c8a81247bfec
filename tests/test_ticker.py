"""The background tick of long evaluations: it ticks while its block runs, stops with it, never costs the
block, and shares the block's ``say`` without interleaving what the two threads send."""

import threading
import time

from noprop_bench.run.ticker import one_at_a_time, ticking


def test_the_tick_runs_while_the_block_runs_and_stops_with_it():
    ticks = []
    with ticking(lambda: ticks.append(time.perf_counter()), every=0.01):
        time.sleep(0.2)
    ended, count = time.perf_counter(), len(ticks)
    time.sleep(0.05)
    assert count >= 3 and len(ticks) == count and ticks[-1] <= ended  # none after the block


def test_a_tick_that_raises_ends_the_ticking_not_the_block():
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("a progress line failed")

    with ticking(broken, every=0.01):
        time.sleep(0.1)
    assert calls == [1]


def test_one_at_a_time_keeps_two_threads_messages_whole():
    sent = []

    def slow_send(message):  # as a pipe might: the bytes of one message go out in pieces
        for character in message:
            sent.append(character)
            time.sleep(0.0005)

    say = one_at_a_time(slow_send)
    threads = [threading.Thread(target=lambda c=c: [say(c * 20) for _ in range(5)]) for c in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    text = "".join(sent)
    assert sorted(text[i:i + 20] for i in range(0, len(text), 20)) == ["a" * 20] * 5 + ["b" * 20] * 5
