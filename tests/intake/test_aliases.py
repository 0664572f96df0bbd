"""Alias expansion: lookup order, recursion, loops, depth, validation."""

from __future__ import annotations

import pytest

from ferry.intake.aliases import MAX_DEPTH, AliasTable

LOCAL = ["example.com", "example.net"]

TABLE = AliasTable(
    {
        "info@example.com": ["a@gmail.com", "b@outlook.com"],
        "sales@example.com": "info@example.com",
        "Bob@Example.COM": "Bob.Smith@Gmail.com",
        "bob+vip@example.com": "vip@gmail.com",
        "team@example.com": ["info@example.com", "carol@yahoo.com", "sales@example.com"],
        "mixed@example.com": ["bob@example.com", "ext@gmail.com", "nobody@example.com"],
        "dup@example.com": ["x@gmail.com", "X@GMAIL.COM", "x@gmail.com"],
        "net@example.com": "catch-me@example.net",
        "@example.net": "catchall@gmail.com",
        "a@example.com": "b@example.com",
        "b@example.com": "a@example.com",
        "p@example.com": ["q@example.com", "p-out@gmail.com"],
        "q@example.com": ["p@example.com", "q-out@gmail.com"],
        "self@example.com": "self@example.com",
        "ghost@example.com": "nobody@example.com",
    },
    LOCAL,
)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        # plain and chained aliases
        ("info@example.com", ["a@gmail.com", "b@outlook.com"]),
        ("sales@example.com", ["a@gmail.com", "b@outlook.com"]),
        ("team@example.com", ["a@gmail.com", "b@outlook.com", "carol@yahoo.com"]),
        # lookup is case-insensitive, targets come back as written
        ("INFO@EXAMPLE.COM", ["a@gmail.com", "b@outlook.com"]),
        ("info@Example.Com.", ["a@gmail.com", "b@outlook.com"]),
        ("bob@example.com", ["Bob.Smith@Gmail.com"]),
        ("BOB@example.com", ["Bob.Smith@Gmail.com"]),
        # subaddress: exact first, then stripped
        ("bob+vip@example.com", ["vip@gmail.com"]),
        ("bob+VIP@example.com", ["vip@gmail.com"]),
        ("bob+news@example.com", ["Bob.Smith@Gmail.com"]),
        ("bob+a+b@example.com", ["Bob.Smith@Gmail.com"]),
        ("info+x@example.com", ["a@gmail.com", "b@outlook.com"]),
        # catch-all, also reached through an alias and after subaddress stripping
        ("anyone@example.net", ["catchall@gmail.com"]),
        ("any+tag@EXAMPLE.NET", ["catchall@gmail.com"]),
        ("net@example.com", ["catchall@gmail.com"]),
        # mixed local/external; a dead local branch just contributes nothing
        ("mixed@example.com", ["Bob.Smith@Gmail.com", "ext@gmail.com"]),
        # dedup keeps the first spelling; domain case folds, local-part case does not
        ("dup@example.com", ["x@gmail.com", "X@GMAIL.COM"]),
        # loops: a revisited address is dropped, the rest survives
        # (depth-first, so the nested alias's targets come before its siblings)
        ("p@example.com", ["q-out@gmail.com", "p-out@gmail.com"]),
        ("q@example.com", ["p-out@gmail.com", "q-out@gmail.com"]),
        # nothing deliverable: None (550 5.1.1)
        ("nobody@example.com", None),
        ("+tag@example.com", None),
        ("a@example.com", None),
        ("self@example.com", None),
        ("ghost@example.com", None),
        # not local: unchanged, even if it looks like an alias key
        ("info@gmail.com", ["info@gmail.com"]),
        ("Someone@Elsewhere.ORG", ["Someone@Elsewhere.ORG"]),
        ("info@sub.example.com", ["info@sub.example.com"]),
    ],
)
def test_expand(address: str, expected: list[str] | None) -> None:
    assert TABLE.expand(address) == expected


def test_exact_subaddress_key_beats_catch_all() -> None:
    table = AliasTable(
        {"u+t@example.com": "t@x.org", "u@example.com": "u@x.org", "@example.com": "all@x.org"},
        ["example.com"],
    )
    assert table.expand("u+t@example.com") == ["t@x.org"]
    assert table.expand("u+other@example.com") == ["u@x.org"]
    assert table.expand("v+t@example.com") == ["all@x.org"]


def test_catch_all_that_targets_its_own_domain_does_not_loop() -> None:
    table = AliasTable({"@example.com": "postmaster@example.com"}, ["example.com"])
    assert table.expand("x@example.com") is None


def test_catch_all_to_a_real_alias() -> None:
    table = AliasTable(
        {"@example.com": "info@example.com", "info@example.com": "boss@x.org"}, ["example.com"]
    )
    assert table.expand("whoever@example.com") == ["boss@x.org"]
    assert table.expand("info@example.com") == ["boss@x.org"]


def test_wildcard_local_domain() -> None:
    table = AliasTable({"@eu.example.com": "eu@x.org"}, ["*.example.com"])
    assert table.expand("a@eu.example.com") == ["eu@x.org"]
    assert table.expand("a@us.example.com") is None
    assert table.expand("a@example.com") == ["a@example.com"]  # apex is not local


def _chain(length: int) -> AliasTable:
    """a0 -> a1 -> ... -> a<length-1> -> out@x.org: ``length`` rewrites."""
    aliases = {f"a{i}@example.com": f"a{i + 1}@example.com" for i in range(length - 1)}
    aliases[f"a{length - 1}@example.com"] = "out@x.org"
    return AliasTable(aliases, ["example.com"])


def test_depth_limit_allows_max_depth_rewrites() -> None:
    assert _chain(MAX_DEPTH).expand("a0@example.com") == ["out@x.org"]


def test_depth_limit_drops_longer_chains() -> None:
    assert MAX_DEPTH == 10
    assert _chain(MAX_DEPTH + 1).expand("a0@example.com") is None
    # Starting further down the same chain is within the limit again.
    assert _chain(MAX_DEPTH + 1).expand("a1@example.com") == ["out@x.org"]


def test_deep_branch_dropped_but_shallow_sibling_kept() -> None:
    aliases: dict[str, str | list[str]] = {
        f"a{i}@example.com": f"a{i + 1}@example.com" for i in range(20)
    }
    aliases["a20@example.com"] = "far@x.org"
    aliases["top@example.com"] = ["a0@example.com", "near@x.org"]
    table = AliasTable(aliases, ["example.com"])
    assert table.expand("top@example.com") == ["near@x.org"]


def test_is_local() -> None:
    assert TABLE.is_local("x@EXAMPLE.com.")
    assert not TABLE.is_local("x@gmail.com")


@pytest.mark.parametrize(
    ("aliases", "message"),
    [
        ({"info@example.com": ["ok@x.org", "not-an-address"]}, "'info@example.com'"),
        ({"info@example.com": "nobody"}, "'info@example.com'"),
        ({"info@example.com": "@x.org"}, "'info@example.com'"),
        ({"info@example.com": "user@"}, "'info@example.com'"),
        ({"info@example.com": []}, "'info@example.com'"),
        ({"info": "a@x.org"}, "'info'"),
        ({"info@": "a@x.org"}, "'info@'"),
        ({"info@gmail.com": "a@x.org"}, "'info@gmail.com'"),
        ({"Info@example.com": "a@x.org", "info@EXAMPLE.com": "b@x.org"}, "'info@EXAMPLE.com'"),
    ],
)
def test_invalid_entries_rejected_naming_the_key(
    aliases: dict[str, str | list[str]], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        AliasTable(aliases, ["example.com"])


def test_expand_rejects_non_address() -> None:
    with pytest.raises(ValueError):
        TABLE.expand("no-at-sign")


def test_table_copies_its_input() -> None:
    source: dict[str, str | list[str]] = {"info@example.com": ["a@x.org"]}
    table = AliasTable(source, ["example.com"])
    source["info@example.com"].append("b@x.org")  # type: ignore[union-attr]
    assert table.expand("info@example.com") == ["a@x.org"]
