"""
tokenizer.py — text <-> token ids for the code model, with no network and no Hugging Face libraries.

    python tokenizer.py DIR "some text"      # encode with DIR/tokenizer.json, print ids and the round trip
    python tokenizer.py --bytes "some text"  # the same with the byte tokenizer of the from-scratch models

- load_tokenizer(dir): a Qwen2.5 / Fast-dLLM v2 `tokenizer.json` (byte-level BPE) as a tiktoken.Encoding,
  with the semantics of the `tokenizers` library that Qwen2 relies on: added tokens are matched in the
  raw text first, the rest is NFC-normalised, split by the pre-tokenizer regex and BPE-encoded.
- byte_tokenizer(): 256 bytes + the ChatML and mask tokens, for models trained from scratch;
  save_byte_tokenizer(dir) writes it as a tokenizer.json so those models load like any checkpoint.
- Tokenizer.chat(prompt): a ChatML user turn as Qwen2.5's template renders it (NOTES.md §5).
"""
import hashlib
import json
import os
import re
import unicodedata
from collections import Counter

import regex  # tiktoken's own dependency: the \p{L} classes of the pre-tokenizer patterns
import tiktoken

from runs import InputError, argparser, read_json, run_cli


MASK_TOKEN = "|<MASK>|"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."  # Qwen2.5's default
CHATML = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")  # turn markers: never inside a message's text


def chatml_marker(text):
    """The first ChatML marker in `text`, or None: encode() reads one as the special token, so text holding
    it would end or open a turn (or stop decoding) where the writer meant characters."""
    return next((m for m in CHATML if m in text), None)
# Qwen2's pre-tokenizer split (tokenizer.json pre_tokenizer.pretokenizers[0].pattern.Regex)
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# train_bpe's split: Qwen2's without contractions and with only a space before a word, so a quoted
# character ('k') is always the same three pieces whichever letter it is; digits stay single
TASK_PATTERN = r" ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def byte_to_unicode():
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest map to 256+n."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + n) for n, b in enumerate(extra)}


def read_added_tokens(path):
    """(content -> id, the ids marked special) of the added tokens in tokenizer.json and added_tokens.json.
    Qwen2.5 adds a few that are not special (<tool_call>, ...): decode(skip_special=True) keeps those."""
    out, special = {}, set()
    tj = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tj):
        tokens = read_json(tj).get("added_tokens", [])
        if not isinstance(tokens, list) or not all(isinstance(t, dict) and isinstance(t.get("content"), str)
                                                   and type(t.get("id")) is int for t in tokens):
            raise InputError(f"{tj}: added_tokens must be a list of objects with a string content and an integer id")
        for t in tokens:
            if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
                raise InputError(f"{tj}: added token {t['content']!r} uses lstrip/rstrip/single_word, "
                                 f"which this tokenizer does not implement")
            out[t["content"]] = t["id"]
            if t.get("special", True):
                special.add(t["id"])
    aj = os.path.join(path, "added_tokens.json")
    if os.path.isfile(aj):
        extra = read_json(aj, "an object of token -> id")
        if not all(type(i) is int for i in extra.values()):
            raise InputError(f"{aj}: every token's id must be an integer")
        if clash := [s for s, i in extra.items() if out.get(s, i) != i]:
            raise InputError(f"{aj}: {clash[0]!r} has id {extra[clash[0]]} here and {out[clash[0]]} in tokenizer.json")
        extra = {s: i for s, i in extra.items() if s not in out}
        out |= extra
        special |= set(extra.values())  # this file has no flag: special, as tokens were before the flag
    return out, special


def find_token(path, content):
    ids, _ = read_added_tokens(path)
    if content not in ids:
        raise InputError(f"{path}: token {content!r} is in neither config.json (mask_token_id) nor "
                         f"tokenizer.json/added_tokens.json")
    return ids[content]


class Tokenizer:
    """Byte-level BPE through tiktoken, with the Hugging Face tokenizers semantics Qwen2 uses:
    added tokens are matched in the raw text first, the rest is NFC-normalised, split by the
    pre-tokenizer regex and BPE-encoded. `enc` is the tiktoken.Encoding."""

    def __init__(self, enc, added, bpe_ids, nfc=True, merges=(), special=None):
        self.enc, self.added, self.nfc, self.merges = enc, added, nfc, list(merges)  # merges: [(bytes, bytes)]
        self.bpe_ids = frozenset(bpe_ids)
        self.special = frozenset(added.values() if special is None else special)  # what skip_special skips
        self.id_to_added = {i: s for s, i in added.items()}
        self.split = re.compile("(" + "|".join(re.escape(s) for s in sorted(added, key=len, reverse=True)) + ")") \
            if added else None
        self.mask_id = added.get(MASK_TOKEN)
        self.stop_ids = [added[s] for s in ("<|im_end|>", "<|endoftext|>") if s in added]
        self.n_vocab = max([enc.max_token_value, *added.values()]) + 1

    def encode(self, text):
        ids = []
        for i, part in enumerate(self.split.split(text) if self.split else [text]):
            if i % 2:  # an added token
                ids.append(self.added[part])
            elif part:
                ids += self.enc.encode_ordinary(unicodedata.normalize("NFC", part) if self.nfc else part)
        return ids

    def decode(self, ids, skip_special=False):
        out, run = [], []
        for i in ids:
            if i not in self.bpe_ids:
                out.append(self.enc.decode(run))
                run = []
                if not skip_special or i not in self.special:  # NOTE: an id the tokenizer does not know (a random
                    out.append(self.id_to_added.get(i, f"<|id:{i}|>"))  # model's, past it) always shows as <|id:N|>
            else:
                run.append(i)
        return "".join(out) + self.enc.decode(run)

    def digest(self):
        """sha256 of what decides the ids (pieces' ranks, added tokens, split pattern, NFC): equal digests,
        equal tokenization. A cache of tokenized data and a resumed run are keyed by it."""
        h = hashlib.sha256(repr((self.enc._pat_str, self.nfc, sorted(self.added.items()))).encode())
        for piece, rank in sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(rank.to_bytes(4, "little") + piece)
        return h.hexdigest()

    @staticmethod
    def chat(prompt, system=QWEN_SYSTEM):
        """A single user turn in ChatML, as Qwen2.5's chat template renders it (Fast-dLLM v2 ships the same):
        with no system message of its own the template adds QWEN_SYSTEM. system='' or None: no system turn."""
        for name, text in (("prompt", prompt), ("system message", system or "")):
            if marker := chatml_marker(text):
                raise InputError(f"the {name} contains the ChatML marker {marker}")
        sys_part = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{sys_part}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def split_pattern(pre, tj):
    """The regex of Qwen2's pre-tokenizer, Sequence[Split(regex, Isolated), ByteLevel(no prefix space, no regex
    of its own)]: the only one encode() reproduces, so any other (GPT-2's ByteLevel regex, an inverted split,
    ...) raises rather than giving other ids than the tokenizers library."""
    pts = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    split, bl = pts if isinstance(pts, list) and len(pts) == 2 else ({}, {})
    pat = split.get("pattern") or {}
    if not (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
            and ("Regex" in pat or "String" in pat) and bl.get("type") == "ByteLevel"
            and not bl.get("add_prefix_space") and bl.get("use_regex") is False):
        raise InputError(f"{tj}: pre-tokenizer {json.dumps(pre)[:300]} is not Qwen2's (Sequence of Split(regex, "
                         f"Isolated) and ByteLevel(add_prefix_space false, use_regex false)), the only one supported")
    return pat["Regex"] if "Regex" in pat else re.escape(pat["String"])


def load_tokenizer(path):
    """tokenizer.json (+ added_tokens.json) of a checkpoint directory -> Tokenizer."""
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
        raise FileNotFoundError(f"{path}: no tokenizer.json")
    spec = read_json(tj)
    m = spec.get("model") or {}
    if not isinstance(m, dict) or m.get("type") != "BPE":
        raise InputError(f"{tj}: only byte-level BPE tokenizers are supported (model "
                         f"{m.get('type') if isinstance(m, dict) else repr(m)[:60]})")
    if not isinstance(m.get("vocab"), dict) or not all(type(i) is int for i in m["vocab"].values()):
        raise InputError(f"{tj}: model.vocab must be an object of token -> integer id")
    pattern = split_pattern(spec.get("pre_tokenizer"), tj)
    if spec.get("normalizer") not in (None, {"type": "NFC"}):
        raise InputError(f"{tj}: unsupported normalizer {json.dumps(spec['normalizer'])[:200]} (NFC or none)")
    u2b = {u: b for b, u in byte_to_unicode().items()}
    to_bytes = lambda tok: bytes(u2b[ch] for ch in tok)
    added, special = read_added_tokens(path)
    ranks = {}
    for tok, i in m["vocab"].items():
        if tok in added:
            continue
        try:
            ranks[to_bytes(tok)] = i
        except KeyError:
            raise InputError(f"{tj}: vocabulary entry {tok!r} (id {i}) is not in the byte-level alphabet") from None
    # byte-level BPE encodes any text only if every single byte has a token; without one, tiktoken
    # would fail on the first text containing that byte, long after loading
    if missing := [b for b in range(256) if bytes([b]) not in ranks]:
        raise InputError(f"{tj}: the vocabulary lacks {len(missing)} of the 256 single bytes (e.g. "
                         f"{[bytes([b]) for b in missing[:5]]}); a byte-level BPE vocabulary needs them all")
    # tiktoken merges the pair whose result has the lowest rank, HF the earliest merge rule: the two
    # agree when ids grow with merge order, which byte-level BPE training guarantees. Check it.
    last, merges = -1, []
    for n, mg in enumerate(m.get("merges", [])):
        a, b = mg.split(" ", 1) if isinstance(mg, str) else mg
        i = m["vocab"].get(a + b)
        if i is None or i <= last:
            raise InputError(f"{tj}: merge {n} ({a!r} + {b!r}) is out of id order; tiktoken cannot reproduce it")
        last = i
        merges.append((to_bytes(a), to_bytes(b)))
    enc = tiktoken.Encoding(name=os.path.basename(os.path.abspath(path)), pat_str=pattern,
                            mergeable_ranks=ranks, special_tokens=added)
    return Tokenizer(enc, added, ranks.values(), nfc=spec.get("normalizer") is not None, merges=merges,
                     special=special)


def save_tokenizer(tok, path):
    """Write a tokenizer built here (byte_tokenizer, bpe_tokenizer) as a Hugging Face tokenizer.json, so a
    model trained with it loads like any checkpoint (load_tokenizer, the tokenizers library)."""
    b2u = byte_to_unicode()
    text = lambda b: "".join(b2u[c] for c in b)
    vocab = {text(b): i for b, i in tok.enc._mergeable_ranks.items()}
    spec = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for s, i in tok.added.items()],
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tok.enc._pat_str}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                                "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": [[text(a), text(b)] for a, b in tok.merges]}}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)


def save_byte_tokenizer(path):
    save_tokenizer(byte_tokenizer(), path)


def bpe_tokenizer(merges, pattern=QWEN2_PATTERN):
    """Byte-level BPE from a merge list [(a, b), ...] of byte strings: ids 0-255 are the bytes, 256 + n is
    merge n's result, then the ChatML and mask tokens. No merges: the byte tokenizer."""
    ranks = {bytes([b]): b for b in range(256)}
    for a, b in merges:
        ranks[a + b] = len(ranks)
    added = {s: len(ranks) + n for n, s in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", MASK_TOKEN])}
    enc = tiktoken.Encoding(name=f"bpe{len(merges)}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=added)
    return Tokenizer(enc, added, ranks.values(), merges=merges)


def byte_tokenizer():
    """A merge-free byte-level tokenizer with the ChatML and mask tokens, for random-init models."""
    return bpe_tokenizer([])


def train_bpe(texts, n_merges, pattern=TASK_PATTERN):
    """Learn n_merges byte-level BPE merges from texts (GPT-2's procedure): split each text with the
    pre-tokenizer pattern, then repeatedly merge the most frequent adjacent pair of symbols inside the
    pieces (ties: the smaller pair). Stops early when no pair occurs twice. -> bpe_tokenizer."""
    counts = Counter(m.encode() for t in texts for m in regex.findall(pattern, unicodedata.normalize("NFC", t)))
    words = [[bytes([c]) for c in w] for w in counts]
    freq = list(counts.values())
    merges = []
    for _ in range(n_merges):  # NOTE: code_tasks.py's 20k problems have ~1,100 distinct pieces: ~1 s
        pairs = Counter()
        for w, f in zip(words, freq):
            for pair in zip(w, w[1:]):
                pairs[pair] += f
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i:i + 2] = [w[i] + w[i + 1]]
                i += 1
    return bpe_tokenizer(merges, pattern)


def main():
    p = argparser(__doc__)
    p.add_argument("dir", nargs="?", help="a checkpoint directory with tokenizer.json")
    p.add_argument("text", help="text to encode")
    p.add_argument("--bytes", action="store_true", help="use the byte tokenizer instead of DIR")
    args = p.parse_args()
    if args.bytes == (args.dir is not None):
        p.error("give DIR TEXT, or --bytes TEXT")
    tok = byte_tokenizer() if args.bytes else load_tokenizer(args.dir)
    ids = tok.encode(args.text)
    print(json.dumps({"ids": ids, "n": len(ids), "decoded": tok.decode(ids), "mask_id": tok.mask_id,
                      "stop_ids": tok.stop_ids, "n_vocab": tok.n_vocab}))


if __name__ == "__main__":
    run_cli(main)
