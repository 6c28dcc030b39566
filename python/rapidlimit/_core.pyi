"""Type stubs for the native module ``rapidlimit._core`` (hand-written).

Every ``now`` argument is epoch seconds as a float (``time.time()``); when it
is omitted the core reads the system clock.
"""

from collections.abc import Sequence

__version__: str

class RateLimitItem:
    """A rate limit: ``amount`` hits per ``multiples`` units of ``granularity``.

    Mirrors ``limits.RateLimitItem``: same key layout, text and equality.
    """

    def __init__(
        self,
        amount: int,
        multiples: int | None = 1,
        namespace: str = "LIMITER",
        *,
        granularity: str = "second",
        burst: int = 0,
    ) -> None: ...
    @property
    def amount(self) -> int: ...
    @property
    def multiples(self) -> int: ...
    @property
    def granularity(self) -> str: ...
    @property
    def namespace(self) -> str: ...
    @property
    def burst(self) -> int:
        """Token bucket burst size; 0 means ``amount``."""
    def with_burst(self, burst: int) -> RateLimitItem: ...
    def get_expiry(self) -> int:
        """Window length in seconds."""
    def key_for(self, *identifiers: object) -> str: ...
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...

def parse(text: str) -> RateLimitItem:
    """Parses a limit string and returns its first limit (``limits.parse``)."""

def parse_many(text: str) -> list[RateLimitItem]:
    """Parses ``"5/minute;100 per day"`` (``limits.parse_many``)."""

def granularity_seconds(name: str) -> int: ...

class Decision:
    """Everything a response needs about one limit after one request."""

    @property
    def allowed(self) -> bool: ...
    @property
    def limit(self) -> int: ...
    @property
    def remaining(self) -> int: ...
    @property
    def reset_time(self) -> float:
        """Epoch seconds at which the window resets."""
    @property
    def retry_after(self) -> float:
        """Seconds to wait before a retry can succeed; 0.0 when allowed."""

class Storage:
    """Base of native stores. Not constructible."""

    def check(self) -> bool: ...
    def reset(self) -> int: ...
    def __len__(self) -> int: ...
    # limits' Storage interface, on raw keys (used by rapidlimit.contrib.limits).
    def incr(
        self, key: str, expiry: float, amount: int = 1, now: float | None = None
    ) -> int: ...
    def get(self, key: str, now: float | None = None) -> int: ...
    def get_expiry(self, key: str, now: float | None = None) -> float: ...
    def clear(self, key: str) -> None: ...
    def acquire_entry(
        self,
        key: str,
        limit: int,
        expiry: float,
        amount: int = 1,
        now: float | None = None,
    ) -> bool: ...
    def get_moving_window(
        self, key: str, limit: int, expiry: float, now: float | None = None
    ) -> tuple[float, int]: ...
    def acquire_sliding_window_entry(
        self,
        key: str,
        limit: int,
        expiry: float,
        amount: int = 1,
        now: float | None = None,
    ) -> bool: ...
    def get_sliding_window(
        self, key: str, expiry: float, now: float | None = None
    ) -> tuple[int, float, int, float]: ...
    def clear_sliding_window(self, key: str, expiry: float) -> None: ...

class MemoryStorage(Storage):
    def __init__(self, max_keys: int = 1_000_000, shards: int = 64) -> None: ...
    @property
    def max_keys(self) -> int: ...
    def memory_bytes(self) -> int:
        """Heap bytes held by the tables (excluding moving-window logs' slack)."""

class RateLimiter:
    """A strategy bound to a storage; base of ``rapidlimit.strategies``."""

    def __init__(self, storage: Storage, strategy: str) -> None: ...
    @property
    def storage(self) -> Storage: ...
    @property
    def strategy(self) -> str: ...
    def hit(
        self,
        item: RateLimitItem,
        *identifiers: object,
        cost: int = 1,
        now: float | None = None,
    ) -> bool: ...
    def test(
        self,
        item: RateLimitItem,
        *identifiers: object,
        cost: int = 1,
        now: float | None = None,
    ) -> bool: ...
    def decide(
        self,
        item: RateLimitItem,
        *identifiers: object,
        cost: int = 1,
        now: float | None = None,
    ) -> Decision: ...
    def get_window_stats(
        self, item: RateLimitItem, *identifiers: object, now: float | None = None
    ) -> tuple[float, int]: ...
    def clear(self, item: RateLimitItem, *identifiers: object) -> None: ...
    def decide_many(
        self,
        requests: Sequence[tuple[RateLimitItem, str, int]],
        now: float | None = None,
        test: bool = False,
    ) -> list[Decision]:
        """Decides several limits in one call, in order.

        Each request is ``(item, identity, cost)``; its storage key is
        ``item.key_for(identity)``. Without ``test`` each is charged and the
        call stops at the first rejection, so the list may be shorter than
        ``requests`` and its last element is then the rejection. With
        ``test`` nothing is charged and every request gets a decision.
        """
