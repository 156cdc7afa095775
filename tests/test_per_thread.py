import threading

import httpx

from app.core.per_thread import PerThread, without_cookies


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


def test_a_client_without_cookies_neither_keeps_nor_sends_them():
    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"set-cookie": "session=1"}, json={"cookie": request.headers.get("cookie")})

    client = without_cookies(httpx.Client(transport=httpx.MockTransport(server)))
    client.get("http://provider.test/")
    assert client.get("http://provider.test/").json() == {"cookie": None}
    assert not client.cookies
