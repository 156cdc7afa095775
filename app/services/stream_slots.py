"""How many job streams each user holds open, so that no one user can hold the connections
everyone shares. Counted in this process: scaled out, each replica bounds its own."""

from collections import Counter

# A stream lasts as long as its job; a refused client may try again this soon.
RETRY_AFTER_SECONDS = 5


class TooManyStreamsError(Exception):
    retry_after = RETRY_AFTER_SECONDS


class StreamSlot:
    """One stream's place in its owner's count: taken once it is sure to be sent, given back
    whenever it ends (giving back a slot never taken, or twice, does nothing)."""

    def __init__(self, slots: "StreamSlots", owner: str) -> None:
        self._slots = slots
        self._owner = owner
        self._held = False

    def take(self) -> None:
        """Raises TooManyStreamsError when the owner holds every slot already."""
        if not self._held:
            self._slots._take(self._owner)
            self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots._give_back(self._owner)


class StreamSlots:
    def __init__(self, per_user: int) -> None:
        self.per_user = per_user
        self._open: Counter[str] = Counter()

    def slot(self, owner: str) -> StreamSlot:
        return StreamSlot(self, owner)

    def open_streams(self, owner: str) -> int:
        return self._open[owner]

    def _take(self, owner: str) -> None:
        if self._open[owner] >= self.per_user:
            raise TooManyStreamsError(
                f"Too many open streams: at most {self.per_user} per user; close one or try again later"
            )
        self._open[owner] += 1

    def _give_back(self, owner: str) -> None:
        self._open[owner] -= 1
        if self._open[owner] <= 0:
            del self._open[owner]
