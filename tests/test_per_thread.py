import threading

from app.core.per_thread import PerThread


def test_each_thread_gets_its_own_value_once_and_close_closes_every_one():
    closed = []
    made = iter(range(100))
    per_thread = PerThread(lambda: next(made), closed.append)
    here = per_thread.get()
    assert per_thread.get() == here

    seen = []
    worker = threading.Thread(target=lambda: seen.extend([per_thread.get(), per_thread.get()]))
    worker.start()
    worker.join()
    assert seen[0] == seen[1] != here

    per_thread.close()
    assert sorted(closed) == sorted([here, seen[0]])
    assert per_thread.get() not in (here, seen[0])  # a closed value is never handed out again
