"""What the load generator sends: synthetic prompts of a set length, or ShareGPT turns.

Token counts are approximated by words: the words below are common English words that
the o200k vocabulary (and every mainstream BPE vocabulary) holds as one token each, with
a leading space. So a prompt of L words is about L prompt tokens plus the chat template.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from gptoss_ray.errors import GptOssError

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will more "
    "what up out who about them some could him into its time only other then new two may first "
    "these like over such our made any after also did many before must through back years where "
    "much your way well down should because each just those people how too little state good very "
    "make world still own see men work long get here between both life being under never day same "
    "another know while last might us great old year off come since against go came right used take"
).split()


@dataclass(frozen=True)
class BenchRequest:
    """One chat request of the workload."""

    prompt: str  # the user message
    prompt_len: int  # approximate prompt tokens (words), used when the server sends no usage
    output_len: int  # max_tokens (and min_tokens when fixed-length output is asked for)


def synthetic_requests(num_requests: int, input_len: int, output_len: int, seed: int = 0) -> list[BenchRequest]:
    """Random word sequences of `input_len` words. Each prompt starts differently, so a
    server's prefix cache cannot turn the workload into a cache-hit benchmark."""
    rng = random.Random(seed)
    return [
        BenchRequest(" ".join(rng.choices(_WORDS, k=input_len)), input_len, output_len)
        for _ in range(num_requests)
    ]


def sharegpt_requests(
    path: str | Path, num_requests: int, output_len: int | None, seed: int = 0
) -> list[BenchRequest]:
    """First human turn of each conversation as the prompt. The output length is
    `output_len` when given, else the word count of the reply that follows (as in the
    dataset, so the workload keeps ShareGPT's length mix). Conversations are shuffled
    with `seed` and reused in order when the file holds fewer than `num_requests`."""
    pairs = _load_sharegpt_pairs(Path(path))
    random.Random(seed).shuffle(pairs)
    out = []
    for i in range(num_requests):
        prompt, reply = pairs[i % len(pairs)]
        n_out = output_len if output_len is not None else max(1, len(reply.split()))
        out.append(BenchRequest(prompt, len(prompt.split()), n_out))
    return out


def _load_sharegpt_pairs(path: Path) -> list[tuple[str, str]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GptOssError(f"--dataset {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptOssError(f"--dataset {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, list):
        raise GptOssError(f"--dataset {path}: expected a JSON list of {{'conversations': [...]}} entries")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            continue
        pair = _first_exchange(turns)
        if pair is not None:
            pairs.append(pair)
    if not pairs:
        raise GptOssError(f"--dataset {path}: no conversation with a non-empty human turn")
    return pairs


def _first_exchange(turns: list) -> tuple[str, str] | None:
    """(first human message, the reply after it or "") or None if there is no human turn."""
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") != "human":
            continue
        prompt = turn.get("value")
        if not isinstance(prompt, str) or not prompt.strip():
            return None
        reply = turns[i + 1].get("value", "") if i + 1 < len(turns) and isinstance(turns[i + 1], dict) else ""
        return prompt, reply if isinstance(reply, str) else ""
    return None
