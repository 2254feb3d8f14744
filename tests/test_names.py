"""One rule each for repo IDs, commit SHAs and rank lists, whoever reads them."""

from __future__ import annotations

import pytest

from lorafid.names import InvalidRanksError, is_commit_sha, is_repo_id, looks_like_short_sha, parse_ranks


@pytest.mark.parametrize("repo", ["org/name", "a/b", "Org_1/model-v2.5", "x" * 40 + "/" + "y" * 55])
def test_hub_repo_ids_are_accepted(repo: str) -> None:
    assert is_repo_id(repo)


@pytest.mark.parametrize(
    "repo",
    [
        "name",
        "a/b/c",
        "org/.hidden",
        "org/name.",
        "org/na..me",
        "org/na--me",
        "-org/name",
        "org/name\n",
        "x" * 48 + "/" + "y" * 48,
        "org /name",
        "",
    ],
)
def test_other_strings_are_not_repo_ids(repo: str) -> None:
    assert not is_repo_id(repo)


def test_a_commit_sha_is_exactly_40_lowercase_hex_digits() -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert is_commit_sha(sha)
    assert not is_commit_sha(sha + "\n")  # ^...$ with re.match let a trailing newline through
    assert not is_commit_sha(sha.upper()) and not is_commit_sha(sha[:-1]) and not is_commit_sha("main")
    assert looks_like_short_sha(sha[:7]) and not looks_like_short_sha(sha[:6])


@pytest.mark.parametrize(
    ("value", "ranks"),
    [("16,64,256", (16, 64, 256)), (" 16 64 ", (16, 64)), ("8; 4|2", (8, 4, 2)), (16, (16,)), ([16, "64"], (16, 64))],
)
def test_rank_lists_in_every_form_read_the_same(value: object, ranks: tuple[int, ...]) -> None:
    assert parse_ranks(value) == ranks  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "at least one"),
        ("16,x", "'x' in the ranks is not a positive whole number"),
        ("0", "not a positive whole number"),
        ("-4", "not a positive whole number"),
        ("16.0", "not a positive whole number"),
        ([True], "not a positive whole number"),
        ("16,16", "appears twice"),
        ("1,2,3", "at most 2"),
        ("99999", r"above the largest allowed here \(4096\)"),
    ],
)
def test_bad_rank_lists_say_what_to_type(value: object, message: str) -> None:
    with pytest.raises(InvalidRanksError, match=message):
        parse_ranks(value, max_count=2, max_rank=4096)  # type: ignore[arg-type]
