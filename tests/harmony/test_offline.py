"""The harmony vocab ships inside the package and loads with the network unreachable."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_ray.harmony import encoding

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_SHA = REPO_ROOT.parent / "shared" / "data" / "o200k_base.tiktoken.sha256"


def test_shipped_vocab_matches_shared_sha256():
    if not SHARED_SHA.is_file():
        pytest.skip(f"{SHARED_SHA} not present")
    expected = SHARED_SHA.read_text().split()[0]
    shipped = hashlib.sha256((encoding.DATA_DIR / encoding.VOCAB_FILE).read_bytes()).hexdigest()
    assert shipped == expected
    assert encoding.verify_vocab() == expected


def test_altered_vocab_is_one_clear_error(tmp_path):
    (tmp_path / encoding.VOCAB_FILE).write_bytes(b"not a vocab\n")
    sha = encoding.DATA_DIR / f"{encoding.VOCAB_FILE}.sha256"
    (tmp_path / sha.name).write_text(sha.read_text())
    with pytest.raises(encoding.ConfigError, match="does not match"):
        encoding.verify_vocab(tmp_path)


_CHILD = """
import os, sys
from gptoss_ray.harmony.encoding import get_encoding, decode, stop_token_ids, DATA_DIR
enc = get_encoding()
assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == str(DATA_DIR), os.environ["TIKTOKEN_ENCODINGS_BASE"]
ids = enc.encode("Hello, harmony!")
assert decode(ids) == "Hello, harmony!"
assert set(stop_token_ids()) == {200002, 200012}
cache = os.environ["TIKTOKEN_RS_CACHE_DIR"]
assert not os.path.exists(cache) or not os.listdir(cache), "harmony downloaded into its cache"
print("OK")
"""


def test_encoding_loads_with_network_unreachable(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIKTOKEN")}
    dead = "http://127.0.0.1:9"  # discard port: nothing listens, every connection fails
    env.update(
        HTTP_PROXY=dead, HTTPS_PROXY=dead, http_proxy=dead, https_proxy=dead, ALL_PROXY=dead,
        NO_PROXY="", no_proxy="",
        # harmony's download cache: an empty directory, so no earlier download is reused
        TIKTOKEN_RS_CACHE_DIR=str(tmp_path / "tiktoken-rs-cache"),
        TIKTOKEN_CACHE_DIR=str(tmp_path / "tiktoken-cache"),
        XDG_CACHE_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path),
    )
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "OK"


def test_user_set_base_dir_is_respected(tmp_path):
    env = dict(os.environ, TIKTOKEN_ENCODINGS_BASE=str(tmp_path),  # empty dir: load must fail
               TIKTOKEN_RS_CACHE_DIR=str(tmp_path / "c"), HTTPS_PROXY="http://127.0.0.1:9")
    code = "from gptoss_ray.harmony.encoding import get_encoding\nget_encoding()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "cannot load the harmony encoding from " + str(tmp_path) in out.stderr
