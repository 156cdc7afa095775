"""The login throttle: attempts counted before bcrypt runs, a bound per account and client and
one per account across clients, fair turns at bcrypt, and the client address as proxies may
(or may not) tell it. Black-box over real HTTP where the contract is the service's."""

import asyncio
import time

import httpx
import pytest

from app.services import auth_service
from app.services.fair_turns import FairTurns, QueueFullError
from app.services.login_throttle import LoginThrottle, LoginThrottledError
from tests.conftest import ALICE, BOB

ALICE_EMAIL, ALICE_PASSWORD = ALICE
WINDOW = 300.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _throttle(max_failures: int = 3, per_account: int = 10) -> tuple[LoginThrottle, FakeClock]:
    clock = FakeClock()
    throttle = LoginThrottle(
        max_failures=max_failures, max_failures_per_account=per_account, window_seconds=WINDOW, clock=clock
    )
    return throttle, clock


# The throttle, on its own ----------------------------------------------------------------------


def test_an_attempt_counts_as_failed_from_the_moment_it_begins():
    throttle, _ = _throttle(max_failures=3)
    for _ in range(3):
        throttle.begin(ALICE_EMAIL, "10.0.0.66")  # none has an outcome yet: bcrypt is still running
    with pytest.raises(LoginThrottledError) as refused:
        throttle.begin(ALICE_EMAIL, "10.0.0.66")
    assert refused.value.retry_after == WINDOW
    assert str(refused.value) == "Too many failed sign-ins; try again later."


def test_the_pair_bound_locks_out_neither_the_owner_nor_other_accounts():
    throttle, _ = _throttle(max_failures=2)
    for _ in range(2):
        throttle.begin(ALICE_EMAIL, "10.0.0.66")
    with pytest.raises(LoginThrottledError):
        throttle.begin(ALICE_EMAIL, "10.0.0.66")
    throttle.begin(ALICE_EMAIL, "10.0.0.7")  # alice herself, from her own machine
    throttle.begin(BOB[0], "10.0.0.66")


def test_a_success_clears_its_clients_failures_for_the_account():
    throttle, _ = _throttle(max_failures=3, per_account=4)
    throttle.begin(ALICE_EMAIL, "10.0.0.66")  # someone else's failure counts for the account
    for _ in range(2):
        throttle.begin(ALICE_EMAIL, "10.0.0.7")
    asyncio.run(throttle.begin(ALICE_EMAIL, "10.0.0.7").succeeded())
    # Her own failures are gone from both bounds; the other client's stays.
    for _ in range(3):
        throttle.begin(ALICE_EMAIL, "10.0.0.7")
    with pytest.raises(LoginThrottledError):
        throttle.begin(ALICE_EMAIL, "10.0.0.8")  # 1 + 3 = the account's 4


def test_a_withdrawn_attempt_is_not_counted():
    throttle, _ = _throttle(max_failures=1, per_account=1)
    asyncio.run(throttle.begin(ALICE_EMAIL, "10.0.0.7").withdraw())  # its password was never checked
    throttle.begin(ALICE_EMAIL, "10.0.0.7")
    with pytest.raises(LoginThrottledError):
        throttle.begin(ALICE_EMAIL, "10.0.0.7")


def test_the_account_bound_holds_across_clients_until_the_window_frees_a_slot():
    throttle, clock = _throttle(max_failures=5, per_account=3)
    for n in range(3):
        throttle.begin(ALICE_EMAIL, f"10.0.1.{n}")
        clock.now += 10
    with pytest.raises(LoginThrottledError) as refused:
        throttle.begin(ALICE_EMAIL, "10.0.2.1")  # a client that never failed
    assert refused.value.retry_after == WINDOW - 30  # when the oldest failure leaves the window
    throttle.begin(BOB[0], "10.0.2.1")  # other accounts are not touched
    clock.now += WINDOW - 30
    throttle.begin(ALICE_EMAIL, "10.0.2.1")  # one slot freed
    with pytest.raises(LoginThrottledError) as refused:
        throttle.begin(ALICE_EMAIL, "10.0.2.2")
    assert refused.value.retry_after == 10


def test_the_retry_after_is_the_longer_wait_when_both_bounds_are_reached():
    throttle, clock = _throttle(max_failures=2, per_account=3)
    throttle.begin(ALICE_EMAIL, "10.0.0.8")
    clock.now += 50
    for _ in range(2):
        throttle.begin(ALICE_EMAIL, "10.0.0.7")
    with pytest.raises(LoginThrottledError) as refused:
        throttle.begin(ALICE_EMAIL, "10.0.0.7")
    assert refused.value.retry_after == WINDOW  # the pair's oldest is newer than the account's


def test_the_throttle_forgets_the_least_recently_used_pairs_and_accounts_first():
    throttle, _ = _throttle(max_failures=1, per_account=1)
    throttle.max_tracked = 2
    throttle.begin("first@example.com", "10.0.0.1")
    throttle.begin("second@example.com", "10.0.0.1")
    throttle.begin("third@example.com", "10.0.0.1")
    throttle.begin("first@example.com", "10.0.0.1")  # forgotten: counted again from nothing
    with pytest.raises(LoginThrottledError):
        throttle.begin("third@example.com", "10.0.0.1")


# Fair turns at the hashing pool ------------------------------------------------------------------


def _waiters(turns: FairTurns, *keys: str) -> list[asyncio.Task]:
    return [asyncio.ensure_future(turns.acquire(key)) for key in keys]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_turns_go_round_robin_across_keys():
    async def scenario() -> list[str]:
        turns = FairTurns(slots=1, per_key=1, queue_per_key=10)
        await turns.acquire("flood")
        granted: list[str] = []

        async def take(key: str) -> None:
            await turns.acquire(key)
            granted.append(key)

        waiters = [asyncio.ensure_future(take(key)) for key in ["flood", "flood", "flood", "alice"]]
        await _settle()
        assert granted == []
        holder = "flood"
        for _ in waiters:
            turns.release(holder)
            await _settle()
            holder = granted[-1]
        return granted

    # Alice came last, but the flood had just had its turn.
    assert asyncio.run(scenario()) == ["alice", "flood", "flood", "flood"]


def test_one_key_never_holds_more_than_its_share_of_slots():
    async def scenario() -> None:
        turns = FairTurns(slots=3, per_key=2, queue_per_key=10)
        await turns.acquire("flood")
        await turns.acquire("flood")
        [third] = _waiters(turns, "flood")
        await _settle()
        assert not third.done()  # a slot is free, but not for this key
        await asyncio.wait_for(turns.acquire("alice"), 1)  # the free slot is another key's at once
        turns.release("flood")
        await asyncio.wait_for(third, 1)

    asyncio.run(scenario())


def test_a_full_queue_refuses_at_once():
    async def scenario() -> None:
        turns = FairTurns(slots=1, per_key=1, queue_per_key=2)
        await turns.acquire("flood")
        queued = _waiters(turns, "flood", "flood")
        await _settle()
        with pytest.raises(QueueFullError):
            await turns.acquire("flood")
        [other] = _waiters(turns, "alice")  # other keys queue as before
        await _settle()
        assert not other.done() and not any(task.done() for task in queued)
        for task in [*queued, other]:
            task.cancel()
        await asyncio.gather(*queued, other, return_exceptions=True)

    asyncio.run(scenario())


def test_a_canceled_waiter_gives_up_its_place_and_a_canceled_holder_its_turn():
    async def scenario() -> None:
        turns = FairTurns(slots=1, per_key=1, queue_per_key=10)
        await turns.acquire("a")
        gone, kept = _waiters(turns, "b", "c")
        await _settle()
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        turns.release("a")
        await asyncio.wait_for(kept, 1)  # b's place was not handed to a canceled waiter
        [granted] = _waiters(turns, "d")
        await _settle()
        turns.release("c")  # hands d its turn...
        granted.cancel()  # ...and d is canceled before it could take it
        await asyncio.gather(granted, return_exceptions=True)
        assert granted.cancelled()
        await asyncio.wait_for(turns.acquire("e"), 1)  # d's turn came back

    asyncio.run(scenario())


# Over real HTTP -----------------------------------------------------------------------------------


def _credentials(email: str, password: str) -> dict[str, str]:
    return {"email": email, "password": password}


def _async_client(server, local_address: str = "127.0.0.1") -> httpx.AsyncClient:
    """A client whose connections come from `local_address` (all of 127/8 is this host)."""
    return httpx.AsyncClient(
        base_url=server.base_url,
        timeout=60,
        transport=httpx.AsyncHTTPTransport(local_address=local_address, limits=httpx.Limits(max_connections=None)),
    )


@pytest.fixture
def bcrypt_checks(monkeypatch) -> list[str]:
    """The password hashes bcrypt checked, in the service under test."""
    checked: list[str] = []
    real_verify = auth_service.verify_password

    def counting(password: str, password_hash: str) -> bool:
        checked.append(password_hash)
        return real_verify(password, password_hash)

    monkeypatch.setattr(auth_service, "verify_password", counting)
    return checked


def _refused(response: httpx.Response) -> bool:
    return (
        response.status_code == 429
        and "Too many" in response.json()["detail"]
        and 0 < int(response.headers["retry-after"]) <= WINDOW
    )


@pytest.mark.slow
def test_a_burst_of_wrong_passwords_gets_no_more_checks_than_the_bound(live_server, bcrypt_checks):
    async def burst(server) -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
        async with _async_client(server) as http:
            guesses = [
                asyncio.ensure_future(http.post("/api/auth/login", json=_credentials(ALICE_EMAIL, f"guess-{n}")))
                for n in range(200)
            ]
            # Once the burst is refused, the right password, while the guesses are still checked.
            for finished in asyncio.as_completed(guesses):
                if (await finished).status_code == 429:
                    break
            right = await http.post("/api/auth/login", json=_credentials(ALICE_EMAIL, ALICE_PASSWORD))
            form = await http.post("/api/auth/token", data={"username": ALICE_EMAIL, "password": ALICE_PASSWORD})
            return list(await asyncio.gather(*guesses)), right, form

    with live_server() as server:  # LOGIN_MAX_FAILURES: 5
        answers, right, form = asyncio.run(burst(server))
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(401) == 5 and statuses.count(429) == 195
    assert all(_refused(answer) for answer in answers if answer.status_code == 429)
    assert _refused(right) and _refused(form)
    assert len(bcrypt_checks) == 5


def _attempt(client: httpx.Client, email: str, password: str, forwarded_for: str) -> int:
    response = client.post(
        "/api/auth/login", json=_credentials(email, password), headers={"X-Forwarded-For": forwarded_for}
    )
    assert response.status_code == 401 or _refused(response) or response.status_code == 200, response.text
    return response.status_code


def test_x_forwarded_for_from_loopback_is_not_believed_by_default(live_server):
    with live_server(LOGIN_MAX_FAILURES=2) as server, server.client() as client:
        assert _attempt(client, ALICE_EMAIL, "guess", "10.0.0.1") == 401
        assert _attempt(client, ALICE_EMAIL, "guess", "10.0.0.2") == 401
        # Still the same client, whatever it says it forwards.
        assert _attempt(client, ALICE_EMAIL, ALICE_PASSWORD, "10.0.0.3") == 429


@pytest.mark.slow
def test_behind_a_trusted_proxy_the_forwarded_address_is_the_client(live_server):
    with (
        live_server(LOGIN_MAX_FAILURES=2, FORWARDED_ALLOW_IPS=["127.0.0.1"]) as server,
        server.client() as client,
    ):
        assert _attempt(client, ALICE_EMAIL, "guess", "203.0.113.9") == 401
        assert _attempt(client, ALICE_EMAIL, "guess", "203.0.113.9") == 401
        assert _attempt(client, ALICE_EMAIL, ALICE_PASSWORD, "203.0.113.9") == 429
        # Alice, behind the same proxy from her own address, is not locked out.
        assert _attempt(client, ALICE_EMAIL, ALICE_PASSWORD, "198.51.100.7") == 200
        # An IPv6 client is its /64: one host commonly holds all of it.
        assert _attempt(client, BOB[0], "guess", "2001:db8:1:2::1") == 401
        assert _attempt(client, BOB[0], "guess", "2001:db8:1:2::abcd") == 401
        assert _attempt(client, BOB[0], BOB[1], "2001:db8:1:2:ffff::9") == 429
        assert _attempt(client, BOB[0], BOB[1], "2001:db8:1:3::1") == 200


@pytest.mark.slow
def test_the_account_bound_holds_across_clients(live_server):
    with (
        live_server(
            LOGIN_MAX_FAILURES=2, LOGIN_MAX_FAILURES_PER_ACCOUNT=3, FORWARDED_ALLOW_IPS=["127.0.0.1"]
        ) as server,
        server.client() as client,
    ):
        for n in range(3):
            assert _attempt(client, ALICE_EMAIL, "guess", f"203.0.113.{n}") == 401
        # Every client is refused now, the owner too: the price of a bound per account.
        assert _attempt(client, ALICE_EMAIL, ALICE_PASSWORD, "198.51.100.7") == 429
        assert _attempt(client, BOB[0], BOB[1], "198.51.100.7") == 200


def _signs_in(server, user: tuple[str, str], address: str) -> tuple[float, float]:
    """A user, from an address of their own and on a thread of their own: (seconds taken, when done)."""
    with httpx.Client(
        base_url=server.base_url, timeout=60, transport=httpx.HTTPTransport(local_address=address)
    ) as http:
        started = time.perf_counter()
        response = http.post("/api/auth/login", json=_credentials(*user))
        signed_in = time.perf_counter()
    assert response.status_code == 200, response.text
    return signed_in - started, signed_in


async def _abandon(flood: list[asyncio.Task]) -> list[int]:
    """The statuses of the flood's answered requests; the rest are abandoned (the service goes
    on checking them until the test stops it)."""
    answered = [request.result().status_code for request in flood if request.done()]
    for request in flood:
        request.cancel()
    await asyncio.gather(*flood, return_exceptions=True)
    return answered


@pytest.mark.slow
def test_a_flood_of_unknown_emails_does_not_hold_up_another_clients_login(service_process):
    async def flood_then_login(server) -> tuple[float, list[int]]:
        async with _async_client(server) as flooder:
            flood = [
                asyncio.ensure_future(
                    flooder.post("/api/auth/login", json=_credentials(f"nobody-{n}@example.com", "x"))
                )
                for n in range(200)
            ]
            # Once the flood is refused, it holds its share of bcrypt and a full queue.
            for finished in asyncio.as_completed(flood):
                if (await finished).status_code == 429:
                    break
            login_seconds, _ = await asyncio.to_thread(_signs_in, server, ALICE, "127.0.0.2")
            return login_seconds, await _abandon(flood)

    # The service in a process of its own: the flood's client does not share its GIL.
    server = service_process(IMAGE_PROVIDER="local")
    alone_seconds, _ = _signs_in(server, BOB, "127.0.0.3")
    login_seconds, answered = asyncio.run(flood_then_login(server))
    unanswered = 200 - len(answered)
    print(
        f"a login alone: {alone_seconds:.3f} s; during the flood: {login_seconds:.3f} s, "
        f"with {unanswered} of the flood's requests still waiting for their check"
    )
    assert set(answered) <= {401, 429} and 429 in answered
    # Served ahead of the flood's queued checks, not behind them (the time itself depends on
    # what else the machine runs).
    assert unanswered > 0


@pytest.mark.slow
def test_a_flood_from_many_addresses_takes_turns_by_address_not_by_request(service_process):
    """Eight addresses flood: a new client waits for one check of each at most (they are clients
    as much as she is), not for everything they queued."""

    async def flood_then_login(server) -> tuple[float, list[int]]:
        async with _async_client(server) as proxy:
            flood = [
                asyncio.ensure_future(
                    proxy.post(
                        "/api/auth/login",
                        json=_credentials(f"nobody-{n}@example.com", "x"),
                        headers={"X-Forwarded-For": f"203.0.113.{n % 8}"},
                    )
                )
                for n in range(48)
            ]
            # Every thread is busy with the flood once its first check is answered.
            await asyncio.wait(flood, return_when=asyncio.FIRST_COMPLETED)
            login_seconds, _ = await asyncio.to_thread(_signs_in, server, ALICE, "127.0.0.2")
            return login_seconds, await _abandon(flood)

    server = service_process(IMAGE_PROVIDER="local", FORWARDED_ALLOW_IPS="127.0.0.1")
    login_seconds, answered = asyncio.run(flood_then_login(server))
    print(f"a login during a flood from 8 addresses: {login_seconds:.3f} s, {len(answered)} of its 48 checks answered")
    assert set(answered) == {401}
    # Her turn came within the first round of the eight: most of the flood was still waiting.
    assert len(answered) < 24
