"""Build the offline GPT-2 BPE tokenizer shipped in ``src/factlens/data/gpt2_tokenizer``.

The source is the official GPT-2 ranks file ``whisper/assets/gpt2.tiktoken`` from the PyPI sdist of
``openai-whisper`` (MIT, Copyright (c) 2022 OpenAI; sha256 306cd27f...d930, identical to tiktoken's
``r50k_base``). Run once::

    pip download --no-deps --no-binary :all: openai-whisper==20250625 -d /tmp/w
    tar xzf /tmp/w/openai_whisper-20250625.tar.gz -C /tmp/w
    python scripts/build_gpt2_tokenizer.py /tmp/w/openai_whisper-20250625/whisper/assets/gpt2.tiktoken
"""

from __future__ import annotations

import base64
import hashlib
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers.convert_slow_tokenizer import bytes_to_unicode

EXPECTED_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
OUT = Path(__file__).resolve().parents[1] / "src" / "factlens" / "data" / "gpt2_tokenizer"


def main(ranks_path: str) -> None:
    raw = Path(ranks_path).read_bytes()
    if hashlib.sha256(raw).hexdigest() != EXPECTED_SHA256:
        raise SystemExit("ranks file does not match the official GPT-2 r50k_base hash")
    ranks = {base64.b64decode(t): int(r) for t, r in (ln.split() for ln in raw.decode().splitlines())}
    b2u = bytes_to_unicode()

    def u(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    def parents(tok: bytes) -> tuple[str, str]:
        # Replay BPE on the token's bytes until two pieces remain: that pair is its merge.
        p = [bytes([x]) for x in tok]
        while len(p) > 2:
            i = min(range(len(p) - 1), key=lambda i: ranks.get(p[i] + p[i + 1], 1 << 30))
            p[i : i + 2] = [p[i] + p[i + 1]]
        return u(p[0]), u(p[1])

    merges = [parents(t) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(t) > 1]
    core = Tokenizer(models.BPE({u(t): r for t, r in ranks.items()}, merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    core.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    OUT.mkdir(parents=True, exist_ok=True)
    core.save(str(OUT / "tokenizer.json"), pretty=False)
    print(f"wrote {OUT} ({len(merges)} merges, vocab {core.get_vocab_size()})")


if __name__ == "__main__":
    main(sys.argv[1])
