"""Differential tests: rapidlimit's parser against the real ``limits`` package.

For every input both parsers must agree on acceptance, on the parsed
``(amount, multiples, granularity)`` and on the error message. The only
intended differences are rapidlimit's bounds, which turn some inputs that
``limits`` accepts into errors: amounts above 1e15, windows longer than 100
"years" (360-day) and strings longer than 4096 UTF-8 bytes.
"""

from __future__ import annotations

import itertools
import random
from typing import Any, Union

import pytest

from conftest import needs_limits_5

limits = pytest.importorskip("limits")
# limits 4 words some errors differently ("couldn't parse rate limit string"
# where limits 5 says "no granularity matched for ...") and accepts "\u017f"
# (long s) for "s" after a granularity.
limits_5_parser = needs_limits_5("its parser differs from limits 5's")
_core = pytest.importorskip("rapidlimit._core")

MAX_AMOUNT = 10**15
MAX_PERIOD_SECONDS = 100 * 360 * 86400
MAX_LENGTH = 4096

Outcome = Union[tuple[str, tuple[tuple[int, int, str], ...]], tuple[str, str]]

# Python's `\s` beyond the ASCII space.
SPACES = [
    "\t", "\n", "\x0b", "\x0c", "\r", "\x1c", "\x1d", "\x1e", "\x1f",
    "\x85", "\xa0", "\u1680", "\u2000", "\u2001", "\u2002", "\u2003",
    "\u2004", "\u2005", "\u2006", "\u2007", "\u2008", "\u2009", "\u200a",
    "\u2028", "\u2029", "\u202f", "\u205f", "\u3000",
]  # fmt: skip
# Space-like characters that `\s` does not match.
NOT_SPACES = ["\u200b", "\ufeff", "\u180e", "\xad", "\u2060", "\x00", "\x7f"]
# Non-ASCII characters `[a-z]` matches under re.IGNORECASE.
ODD_LETTERS = ["\u0130", "\u0131", "\u017f", "\u212a"]
NAMES = ["second", "minute", "hour", "day", "month", "year"]


def _corpus() -> list[str]:
    out: list[str] = []
    for name in NAMES:
        for spelled in [name, name + "s", name.upper(), name.title() + "S",
                        name + "ss", name[:-1], "s" + name]:  # fmt: skip
            out += [f"1/{spelled}", f"3 per 2 {spelled}", f"7per{spelled}"]
    for sep in ["/", " / ", "per", " per ", "PER", "Per", "pEr", "\tper\t",
                "//", "pe r", "perr", "-", "", " ", ":", "per per"]:  # fmt: skip
        out += [f"10{sep}minute", f"10{sep}2 minutes", f"10{sep}2minutes"]
    for mult in ["", "1", "2", "0", "00", "0" * 40, "007", "1 0", " 5 ",
                 "-1", "+1", "1.5", "\uff15"]:  # fmt: skip
        out += [f"5/{mult}hours", f"5 per {mult} hour"]
    for amount in ["0", "00", "1", "007", "0" * 50 + "7", "-1", "+1", "1.0",
                   "1e3", "1_000", "\uff11", "\u0661", "", " ", "1 1"]:  # fmt: skip
        out += [f"{amount}/second", f"{amount} per 2 day"]
    for ws in [" "] + SPACES:
        out += [
            f"{ws}1/second", f"1{ws}/second", f"1/{ws}second",
            f"1{ws}per{ws}2{ws}minutes{ws}", f"1/second{ws};{ws}2/minute",
        ]  # fmt: skip
    for ws in NOT_SPACES:
        out += [f"{ws}1/second", f"1{ws}/second", f"1/second{ws}"]
    for odd in ODD_LETTERS:
        out += [f"1/{odd}", f"1/second{odd}", f"1/m{odd}nute", f"1 per {odd}day",
                f"1/second;2/{odd}", f"1/{odd};junk", f"1 {odd}er second"]  # fmt: skip
    pair = ("1/second", "5 per 2 minutes")
    for join in [",", ";", "|", " , ", ":,", ":;", ":|", " :;", ": ;", "::,",
                 ",:", ";;", ",,", ":", " ", "\u3000:;"]:  # fmt: skip
        out += [pair[0] + join + pair[1], pair[1] + join + pair[0]]
    out += [
        "", " ", "\n", ",", ";", "|", ":", ":,", ",,", "1/second,",
        "1/second:", "1/second:;", ",1/second", "1/second\n", "\n1/second",
        "1/second\r\n;2/minute", "1\x00/second", "1/second 2/minute",
        "1/sec ond", "1.5/second", "abc", "1/2", "10/minute minute",
        "1 per 2 3 minutes", "1/second;2/minute;3/hour;4/day;5/month;6/year",
        "1/second:;2/minute:,3/hour:|4/day", "1/x;2/y", "1/second;2/weeks",
        ";".join(["1/second"] * 40), "\U0001f600/second", "1/second\U0001f600",
    ]  # fmt: skip
    # Around the bounds: `limits` takes all of these, rapidlimit not all.
    out += [
        "1000000000000000/second", "1000000000000001/second",
        "9223372036854775808/second", "9" * 40 + "/second",
        "1/100 years", "1/101 years", "1/1200 months", "1/1201 months",
        "1/3110400000 seconds", "1/3110400001 seconds",
        "1/" + "0" * 60 + " second", "1/" + "0" * 60 + "9 second",
        "1/second;" + "9" * 30 + "/minute", "9" * 30 + "/second;1/weeks",
    ]  # fmt: skip
    # Around the length bound (UTF-8 bytes, not characters).
    out += [
        "1/second".ljust(MAX_LENGTH), "1/second".ljust(MAX_LENGTH + 1),
        "1/second" + "\u3000" * ((MAX_LENGTH - 8) // 3),
        "1/second" + "\u3000" * ((MAX_LENGTH - 8) // 3 + 1),
        "1/x" + " " * 5000, "x" * 10000,
    ]  # fmt: skip
    amounts = ["0", "1", "10", "010"]
    seps = ["/", " per ", "PER", "\tPer\u3000"]
    mults = ["", "3", "0", " 12 "]
    grans = ["second", "MINUTES", "Hours", "day", "months", "YEAR", "yr"]
    out += ["".join(p) for p in itertools.product(amounts, seps, mults, grans)]
    return list(dict.fromkeys(out))


CORPUS = _corpus()


def _out_of_bounds(text: str, items: list[Any]) -> bool:
    return len(text.encode("utf-8")) > MAX_LENGTH or any(
        item.amount > MAX_AMOUNT or item.get_expiry() > MAX_PERIOD_SECONDS
        for item in items
    )


def _triple(item: Any) -> tuple[int, int, str]:
    if isinstance(item, limits.RateLimitItem):
        return (item.amount, item.multiples, item.GRANULARITY.name)
    return (item.amount, item.multiples, item.granularity)


def _run(parse: Any, text: str) -> Outcome:
    try:
        result = parse(text)
    except ValueError as error:
        return ("error", str(error))
    items = result if isinstance(result, list) else [result]
    return ("ok", tuple(_triple(item) for item in items))


def _check(text: str) -> None:
    too_long = len(text.encode("utf-8")) > MAX_LENGTH
    for ours, theirs in [
        (_core.parse_many, limits.parse_many),
        (_core.parse, limits.parse),
    ]:
        expected = _run(theirs, text)
        got = _run(ours, text)
        if too_long:
            # Rejected before the syntax is looked at, whatever `limits`
            # makes of it; the message quotes only a prefix.
            assert got[0] == "error", (text, got)
            message = got[1]
            assert isinstance(message, str)
            assert message.startswith("couldn't parse rate limit string '")
            assert len(message) < 300
        elif expected[0] == "ok" and _out_of_bounds(text, limits.parse_many(text)):
            assert got[0] == "error", (text, got)
            message = got[1]
            assert isinstance(message, str)
            prefix = f"couldn't parse rate limit string '{text}'"
            assert message.startswith(prefix), message
        else:
            assert got == expected, text


def _id(text: str) -> str:
    return repr(text)[:40]


def test_corpus_is_large() -> None:
    assert len(CORPUS) > 500


@limits_5_parser
@pytest.mark.parametrize("text", CORPUS, ids=_id)
def test_same_result_as_limits(text: str) -> None:
    _check(text)


def _random_single(rng: random.Random) -> str:
    """A mostly-valid limit, so that accepting paths get exercised too."""

    def ws() -> str:
        return rng.choice(["", "", "", " ", " ", "\t", "\u3000", "\n"])

    def rare(common: list[str], odd: list[str]) -> str:
        return rng.choice(odd if rng.random() < 0.04 else common)

    return "".join([
        ws(), rare(["0", "1", "5", "007", "42"], ["9" * 17, "", "x"]), ws(),
        rare(["/", "/", "per", "Per"], ["pe", "", "//", "\u200b"]), ws(),
        rare(["", "", "0", "2", "60", "101"], ["9" * 12, "-1"]), ws(),
        rare([*NAMES, "Minutes", "YEARS"], ["wk", "\u212a", "", "\u017fecond"]),
        rare(["", "", "s", "S"], ["x", "ss", ":"]), ws(),
    ])  # fmt: skip


def _random_strings(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    tokens = [
        "0", "1", "2", "9", "00", "10", "007", "9" * 20, "/", "per", "PER",
        "p", "e", "r", " ", "  ", "\t", "\n", "\x0b", "\x1c", "\x85", "\xa0",
        "\u2003", "\u2028", "\u3000", "\u200b", "\ufeff", "\x00", "second",
        "seconds", "minute", "MINUTES", "hour", "Hours", "day", "days",
        "month", "year", "YEARS", "s", "S", "x", "week", *ODD_LETTERS,
        "\u00e9", "\uff11", ",", ";", "|", ":", "-", ".", "1/second",
        "5 per 2 minutes", "\U0001f600",
    ]  # fmt: skip
    out = []
    for _ in range(count):
        if rng.random() < 0.5:
            out.append("".join(rng.choice(tokens) for _ in range(rng.randint(0, 14))))
            continue
        text = _random_single(rng)
        for _ in range(rng.choice([0, 0, 1, 2])):
            text += rng.choice([",", ";", "|", ":,", ":;", " , ", "::|", ",,"])
            text += _random_single(rng)
        out.append(text)
    return out


@limits_5_parser
@pytest.mark.parametrize("seed", range(8))
def test_random_strings_same_result_as_limits(seed: int) -> None:
    for text in _random_strings(seed, 500):
        _check(text)


def _accepted() -> list[str]:
    accepted = []
    for text in CORPUS:
        try:
            items = limits.parse_many(text)
        except ValueError:
            continue
        if not _out_of_bounds(text, items):
            accepted.append(text)
    return accepted


ACCEPTED = _accepted()


def test_enough_accepted_strings() -> None:
    assert len(ACCEPTED) > 200


@limits_5_parser
@pytest.mark.parametrize("text", ACCEPTED, ids=_id)
def test_items_behave_like_limits(text: str) -> None:
    ours = _core.parse_many(text)
    theirs = limits.parse_many(text)
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs):
        assert str(mine) == str(reference)
        assert mine.get_expiry() == reference.get_expiry()
        assert mine.namespace == reference.namespace == "LIMITER"
        assert mine.granularity == reference.GRANULARITY.name
        assert mine.key_for() == reference.key_for()
        assert mine.key_for("user") == reference.key_for("user")
        assert mine.key_for("a", "b/c", "") == reference.key_for("a", "b/c", "")
        assert mine.key_for(42, "x") == reference.key_for(42, "x")
    first = _core.parse(text)
    assert str(first) == str(limits.parse(text))
    assert first == ours[0]


def test_key_for_other_identifier_types() -> None:
    # limits stringifies ints and floats with str() and decodes bytes.
    ours = _core.parse("5/2 minutes")
    theirs = limits.parse("5/2 minutes")
    for identifiers in [(1,), (2.5,), (b"raw",), ("\u00e9", 0, -3)]:
        assert ours.key_for(*identifiers) == theirs.key_for(*identifiers)


def test_str_examples() -> None:
    assert str(_core.parse("5/minute")) == "5 per 1 minute"
    assert str(_core.parse("10 PER 3 HOURS")) == "10 per 3 hour"
    assert str(_core.parse("0/0 year")) == "0 per 1 year"


def test_zero_multiples_mean_one() -> None:
    for text in ["5/0 hours", "5/000 hours", "5/hours"]:
        item = _core.parse(text)
        assert item.multiples == 1
        assert item.get_expiry() == 3600


def test_equality_ignores_namespace_like_limits() -> None:
    a = _core.parse("5/minute")
    b = _core.parse("5 per 1 minutes")
    assert a == b
    assert hash(a) == hash(b)
    other_namespace = _core.RateLimitItem(5, 1, "OTHER", granularity="minute")
    assert a == other_namespace
    assert hash(a) == hash(other_namespace)
    # What limits says about the same pair.
    assert limits.parse("5/minute") == limits.RateLimitItemPerMinute(5, 1, "OTHER")
    assert a != _core.parse("5/60 seconds")
    assert a != _core.parse("6/minute")
    assert a != _core.parse("5/2 minutes")


def test_error_messages() -> None:
    with pytest.raises(ValueError, match="^couldn't parse rate limit string 'x'$"):
        _core.parse("x")
    with pytest.raises(ValueError, match="^no granularity matched for Weeks$"):
        _core.parse_many("1/second;2/Weeks")
    with pytest.raises(ValueError, match="^no granularity matched for \u212a$"):
        _core.parse("1/\u212a")
