"""Bearer tokens for the HTTP port: read once, kept as digests, compared in constant time."""

from __future__ import annotations

import pytest

from daemon.http_auth import Denied, Tokens, load_tokens

TOKEN = "0123456789abcdef0123"


def test_a_tokens_file_takes_named_and_bare_tokens_and_comments(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# rotate by adding the new one first\nprometheus:{TOKEN}\n\nzz{TOKEN}\n")
    tokens = load_tokens(path)
    assert tokens.holder(TOKEN) == "prometheus"
    assert tokens.holder(f"zz{TOKEN}") == "token-4"
    assert tokens.holder(TOKEN[:-1]) is None


def test_tokens_are_kept_as_digests_only(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"ops:{TOKEN}\n")
    assert TOKEN.encode() not in repr(load_tokens(path)).encode()


@pytest.mark.parametrize("line", ["short", "ops:short", f"ops:{TOKEN} {TOKEN}"])
def test_a_weak_token_is_refused_naming_its_line_never_the_token(tmp_path, line):
    path = tmp_path / "tokens"
    path.write_text(f"# header\n{line}\n")
    with pytest.raises(ValueError, match="line 2: a token must be at least 16") as caught:
        load_tokens(path)
    assert "short" not in str(caught.value)


def test_a_file_with_no_token_is_refused(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="names no token"):
        load_tokens(path)


def test_with_tokens_a_request_needs_one_of_them_wherever_it_comes_from(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\n")
    tokens = load_tokens(path)
    assert tokens.check(None, "127.0.0.1") is Denied.MISSING
    assert tokens.check("x" * 20, "127.0.0.1") is Denied.INVALID
    assert tokens.check(TOKEN, "203.0.113.9") is None


@pytest.mark.parametrize(
    ("client", "denied"),
    [
        ("127.0.0.1", None),
        ("127.8.9.1", None),
        ("::1", None),
        ("192.0.2.2", Denied.NOT_CONFIGURED),
        ("::ffff:192.0.2.2", Denied.NOT_CONFIGURED),
        ("fd00::2", Denied.NOT_CONFIGURED),
        (None, Denied.NOT_CONFIGURED),
        ("testclient", Denied.NOT_CONFIGURED),
    ],
)
def test_without_tokens_only_loopback_clients_read_data(client, denied):
    assert Tokens().check(None, client) is denied
