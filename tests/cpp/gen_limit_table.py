"""Regenerates the parse table in limit_test.cc from the real `limits` package.

Every expectation in the table is what `limits.parse_many` returned (or the
message it raised) for that input, so the C++ parser is held to the
reference implementation rather than to our reading of its regex.

    python3 tests/cpp/gen_limit_table.py   # rewrites tests/cpp/limit_test.cc

Needs `limits` (the table was made with 5.8.0). Inputs that `limits`
accepts but that break rapidlimit's bounds (amount > 1e15, period > 100
years) are marked as bounds errors.
"""

from __future__ import annotations

import itertools
import pathlib
import random

import limits
from limits import parse_many

K_MAX_AMOUNT = 10**15
K_MAX_PERIOD_SECONDS = 100 * 360 * 86400

GRANULARITY_ENUM = {
    "second": "kSecond",
    "minute": "kMinute",
    "hour": "kHour",
    "day": "kDay",
    "month": "kMonth",
    "year": "kYear",
}

NAMES = list(GRANULARITY_ENUM)

# Python's `\s` (str.isspace()) beyond ASCII space.
UNICODE_SPACES = [
    "\t", "\n", "\x0b", "\x0c", "\r", "\x1c", "\x1d", "\x1e", "\x1f",
    "\x85", "\xa0", "\u1680", "\u2000", "\u2001", "\u2002", "\u2003",
    "\u2004", "\u2005", "\u2006", "\u2007", "\u2008", "\u2009", "\u200a",
    "\u2028", "\u2029", "\u202f", "\u205f", "\u3000",
]
# Look like spaces, but `\s` does not match them.
NOT_SPACES = ["\u200b", "\ufeff", "\u180e", "\xad", "\u2060", "\x00", "\x7f"]
# `[a-z]` with re.IGNORECASE matches these too.
ODD_LETTERS = ["\u0130", "\u0131", "\u017f", "\u212a"]


def cases() -> list[str]:
    out: list[str] = []
    add = out.append

    # Every granularity in every spelling we can think of.
    for name in NAMES:
        for spelled in dict.fromkeys([
            name, name + "s", name.upper(), name.upper() + "S",
            name.title(), name.title() + "s", name + "S",
            "".join(c.upper() if i % 2 else c for i, c in enumerate(name)),
            name + "ss", name[:-1], name + "es", name + "z", "s" + name,
        ]):
            add(f"1/{spelled}")
            add(f"3 per {spelled}")
    for bad in ["sec", "secs", "min", "mins", "hr", "hrs", "d", "week",
                "weeks", "ms", "k", "per", "pers", "s", "x", "seconde",
                "minut", "yearly", "daily", "hours_", "SECONDSS"]:
        add(f"1/{bad}")
        add(f"2 per 5 {bad}")

    # Separators between amount and granularity.
    for sep in ["/", " /", "/ ", " / ", "per", " per", "per ", " per ",
                "PER", "Per", "pEr", "peR", " PeR ", "\tper\t", "  per  ",
                "//", "pe r", "p er", "perr", "pper", " pe ", "\\", "-",
                "per/", "/per", "for", "every", " ", "", ":", "per per"]:
        add(f"10{sep}minute")
        add(f"10{sep}2 minutes")
        add(f"10{sep}2minutes")

    # Multiples, including the "0 means 1" quirk.
    for mult in ["", "1", "2", "0", "00", "0" * 40, "007", "10", "1 0",
                 "60", "0001", " 5 ", "5 ", " 5", "-1", "+1", "1.5", "1e2",
                 "\uff15"]:
        add(f"5/{mult}hours")
        add(f"5/{mult} hour")
        add(f"5 per {mult} hours")

    # Amounts.
    for amount in ["0", "00", "1", "007", "42", "1000000", "0" * 50 + "7",
                   "-1", "+1", "1.0", "1e3", "1_000", "\uff11", "\u0661",
                   "one", "", " ", "1 1", "0x10"]:
        add(f"{amount}/second")
        add(f"{amount} per 2 day")

    # Whitespace around every token, ASCII and Unicode.
    for ws in [" ", "  "] + UNICODE_SPACES:
        add(f"{ws}1/second")
        add(f"1{ws}/second")
        add(f"1/{ws}second")
        add(f"1 per{ws}2{ws}minutes")
        add(f"1{ws}per{ws}minute{ws}")
        add(f"1/second{ws};{ws}2/minute")
        add(f"{ws}1{ws}per{ws}3{ws}hour{ws}")
        add(f"1{ws}/{ws}2{ws}day{ws},{ws}5{ws}per{ws}year{ws}")
    for ws in NOT_SPACES:
        add(f"{ws}1/second")
        add(f"1{ws}/second")
        add(f"1/{ws}second")
        add(f"1/second{ws}")
        add(f"1 per 2{ws}minutes")

    # Letters that `[a-z]` matches case-insensitively but that are not ASCII.
    for odd in ODD_LETTERS:
        add(f"1/{odd}")
        add(f"1/second{odd}")
        add(f"1/{odd}econd")
        add(f"1/m{odd}nute")
        add(f"1 per {odd}day")
        add(f"1 per 2 da{odd}")
        add(f"1/second;2/{odd}")
        add(f"1/{odd};2/second")
        add(f"1/{odd} x")
        add(f"1 {odd}er second")
    add("1/\u00e9")
    add("1/minut\u00e9")
    add("1/\u00df")
    add("1/se\u0301cond")

    # Lists of limits, the separators, and the ':' typo in "(:?".
    pair = ("1/second", "5 per 2 minutes")
    for sep in [",", ";", "|", " ,", ", ", " , ", ":,", ":;", ":|", " :;",
                ": ;", "::,", ",:", ";;", ",,", "|;", ": :,", ":", "/",
                " ", "\t;\t", "\n,\n", ",\u3000", "\u3000:;", "\xa0:|"]:
        add(pair[0] + sep + pair[1])
        add(pair[1] + sep + pair[0])
    add("1/second;2/minute;3/hour;4/day;5/month;6/year")
    add("1/second:;2/minute:,3/hour:|4/day")
    add("1/second:;2/minute:,3/hour:|4/day:")
    add("1/second:;2/minute:,3/hour:|4/day,")
    add("1/second|2/seconds|3/SECONDS|4 per 4 second")
    add("1/second;2/minute;3/hour;4/day;5/month;6/year;7/week")
    add("1/week;2/minute")
    add("1/second;2/weeks;3/days;4/xs")
    add("1/minutes,1/minutes")
    add("100/day;10/hour;1/minute")
    add(";".join(["1/second"] * 50))
    add(",".join(f"{i} per {i} minutes" for i in range(1, 30)))

    # Leading, trailing and lone separators.
    for s in [",", ";", "|", ":", ":,", ",,", ";;", "||", ",;|", " , ",
              ":;:", "1/second,", "1/second;", "1/second|", "1/second:",
              "1/second:,", "1/second:;", ",1/second", ";1/second",
              ":;1/second", "1/second, ", "1/second ;", "1/second,;",
              "1/second; ;2/minute", "1/second,,2/minute", ":1/second",
              "1/second:2/minute", "1/second :,2/minute", "1/second: ,2/minute",
              "1:/second", "1/:second", "1/second:\n", "1/second\n:,2/minute"]:
        add(s)

    # Junk and near misses.
    for s in ["", " ", "\n", "\t \n", "/", "per", "1", "1/", "1 per",
              "/second", "per second", "second", "1 second", "second/1",
              "minute per 1", "1//second", "1/ /second", "1/2/second",
              "1/second/2", "1 per 2 per second", "1/second 2/minute",
              "1/sec ond", "1/second 1", "1/second!", "!1/second",
              "1/second.", "1.5/second", "1,5/second", "-1/second",
              "+1/second", "1e3/second", "abc", "1 / 2", "1/2",
              "10/minute minute", "1/2 3 minutes", "1/2 3minutes",
              "1 per 2 3 minutes", "1 per-2 minutes", "1/second=", "1=second",
              "1\x00/second", "1/second\x00", "\x001/second",
              "1/second\r\n", "\r\n1/second", "1\n/\nsecond", "1/second\n\n",
              "1/second\r\n;2/minute", "1/minute\n", "\n", "1/second#x",
              "'1/second'", '"1/second"', "(1/second)", "1/second)",
              "1/second;", "1/ second ;2 / minute ", "1 /second",
              "1 per 1 second extra", "1 per 1 second 2",
              "\u0661/second", "\uff11/second", "1\uff0fsecond", "1 \u0440er second"]:
        add(s)

    # Numbers that `limits` reads with an unbounded int().
    for s in ["1000000000000000/second", "1000000000000001/second",
              "999999999999999/second", "9223372036854775807/second",
              "9223372036854775808/second", "18446744073709551616/second",
              "9" * 40 + "/second", "0" * 60 + "1/second",
              "1/" + "0" * 60 + " second", "1/" + "0" * 60 + "1 second",
              "1/100 years", "1/101 years", "1/1200 months", "1/1201 months",
              "1/36000 days", "1/36001 days", "1/864000 hours",
              "1/864001 hours", "1/51840000 minutes", "1/51840001 minutes",
              "1/3110400000 seconds", "1/3110400001 seconds",
              "1/9223372036854775807 seconds",
              "1/9223372036854775808 seconds", "1/" + "9" * 40 + " seconds",
              "1/second;" + "9" * 30 + "/minute",
              "1/second;1/" + "9" * 30 + " minute",
              "9" * 30 + "/second;1/weeks",
              "1/" + "9" * 30 + " second;1/x"]:
        add(s)

    # A seeded sample of the product of all token variants.
    rng = random.Random(20240611)
    amounts = ["0", "1", "7", "10", "010", "123456"]
    seps = ["/", " / ", "per", " per ", "PER", "\tPer\u3000", "/\xa0"]
    mults = ["", "1", "3", "0", "00", "12", " 4 "]
    grans = ["second", "seconds", "MINUTE", "Minutes", "hour", "HOURS",
             "day", "Days", "month", "months", "year", "YEARS", "yr", "sec",
             "weeks", "hourss"]
    pads = ["", " ", "\t", "\u2003"]
    product = list(itertools.product(amounts, seps, mults, grans))
    for amount, sep, mult, gran in rng.sample(product, 220):
        add(f"{rng.choice(pads)}{amount}{sep}{mult}{gran}{rng.choice(pads)}")
    joins = [",", ";", "|", ":;", " , ", ":|"]
    for _ in range(60):
        parts = [
            f"{rng.choice(amounts)}{rng.choice(seps)}{rng.choice(mults)}"
            f"{rng.choice(grans)}"
            for _ in range(rng.randint(2, 4))
        ]
        text = parts[0]
        for part in parts[1:]:
            text += rng.choice(joins) + part
        add(text)

    seen: set[str] = set()
    unique = []
    for s in out:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


def cpp_literal(text: str) -> str:
    """A C++ string_view literal for the UTF-8 bytes of `text`."""
    pieces = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in '"\\?':
            pieces.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            pieces.append(char)
        else:
            # Always three octal digits so a following digit is not eaten.
            pieces.append(f"\\{byte:03o}")
    return '"' + "".join(pieces) + '"sv'


def expectation(text: str) -> str:
    try:
        items = parse_many(text)
    except ValueError as error:
        return f"{{{cpp_literal(text)}, {{}}, {cpp_literal(str(error))}, false}}"
    out_of_bounds = any(
        item.amount > K_MAX_AMOUNT or item.get_expiry() > K_MAX_PERIOD_SECONDS
        for item in items
    )
    if out_of_bounds:
        return f"{{{cpp_literal(text)}, {{}}, \"\"sv, true}}"
    limits_text = ", ".join(
        f"{{{item.amount}, {item.multiples}, "
        f"Granularity::{GRANULARITY_ENUM[item.GRANULARITY.name]}}}"
        for item in items
    )
    return f"{{{cpp_literal(text)}, {{{limits_text}}}, \"\"sv, false}}"


def main() -> None:
    path = pathlib.Path(__file__).with_name("limit_test.cc")
    source = path.read_text()
    begin = "// BEGIN GENERATED by gen_limit_table.py"
    end = "// END GENERATED"
    head, rest = source.split(begin, 1)
    _, tail = rest.split(end, 1)
    rows = [expectation(text) for text in cases()]
    body = (
        f"{begin} from limits {limits.__version__}; do not edit.\n"
        "// clang-format off\n"
        "constexpr ParseCase kParseCases[] = {\n"
        + "".join(f"    {row},\n" for row in rows)
        + "};\n// clang-format on\n"
    )
    path.write_text(head + body + end + tail)
    print(f"{len(rows)} cases written to {path}")


if __name__ == "__main__":
    main()
