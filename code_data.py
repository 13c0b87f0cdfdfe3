"""
code_data.py — the code model's data (NOTES.md §5): the Python standard library as an offline corpus,
chat JSONL for fine-tuning, code_tasks.py's generated problems, and the row stream train_code.py draws from.

    python code_data.py                       # tokenize (and cache) the standard library, print its size
    python code_data.py --check chat.jsonl    # validate a chat file: `file:line: reason` on the first bad row

- load_stdlib: this interpreter's standard library (no test/site-packages dirs), byte-level tiktoken
  ids, split by file (crc32(path) % 50 == 0 is held out), files joined by <|endoftext|>, cached.
- read_chat_jsonl: {"messages": [{"role", "content"}, ...]} rows in ChatML, assistant tokens supervised.
- synthetic_problems / synthetic_tokenizer: code_tasks.py's problems (cached per process) and a byte-level
  BPE learned from the training problems; synthetic_rows: prompt -> body rows, the body supervised.
- Rows: random training rows as (x0, fixed) tensors; its numpy state is the data position.
"""
import hashlib
import json
import os
import re
import sys
import sysconfig
import zlib
from functools import lru_cache

import numpy as np
import torch
from tqdm import tqdm

from code_tasks import make_problems
from runs import InputError, argparser, cached, positive_int, run_cli
from tokenizer import MASK_TOKEN, byte_tokenizer, chatml_marker, train_bpe



def stdlib_files():
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "dist-packages", "test", "tests",
                                                      "idlelib", "__pycache__"))
        out += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    return root, out


def load_stdlib(tok, cache_dir):
    """Token streams of the standard library, split by file (crc32(path) % 50 == 0 is held out);
    files joined by <|endoftext|>. Cached per Python version."""
    root, files = stdlib_files()
    # keyed by the tokenizer's digest: two tokenizers of one size (two exports named hf) tokenize differently
    path = os.path.join(cache_dir, f"stdlib_py{sys.version_info[0]}{sys.version_info[1]}_{tok.digest()[:16]}.npz")

    def tokenize():
        eot = tok.added["<|endoftext|>"]
        parts = {"train": [], "val": [], "val_files": []}
        for f in tqdm(files, desc="tokenizing the standard library", leave=False):
            rel = os.path.relpath(f, root)
            with open(f, encoding="utf-8", errors="replace") as fh:
                ids = tok.encode(fh.read()) + [eot]
            split = "val" if zlib.crc32(rel.encode()) % 50 == 0 else "train"
            parts[split].append(np.array(ids, dtype=np.int32))
            if split == "val":
                parts["val_files"].append(rel)
        return {"train": np.concatenate(parts["train"]), "val": np.concatenate(parts["val"]),
                "val_files": np.array(parts["val_files"])}
    return cached(path, tokenize, compress=False)


MAX_ROW_BYTES = 1 << 20  # a chat row must fit --seq-len tokens; 1 MiB is far past that for any --seq-len here


def jsonl_lines(path):
    """(line number, text) of each non-blank line of a UTF-8 JSONL file (a byte-order mark at the start
    is allowed). Read as bytes, so a huge row is refused by its length before it is decoded or
    tokenized (readline never reads past MAX_ROW_BYTES + 2: a row of the limit and its \r\n), and bad
    UTF-8 names its line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(iter(lambda: f.readline(MAX_ROW_BYTES + 2), b""), 1):
            where = f"{path}:{n}"
            if n == 1 and raw.startswith(b"\x1f\x8b"):  # gzip's magic: not text at all
                raise InputError(f"{path}: a gzip file; decompress it (or pass <(zcat {path}))")
            if len(raw.rstrip(b"\r\n")) > MAX_ROW_BYTES:
                raise InputError(f"{where}: row longer than {MAX_ROW_BYTES} bytes (a row must fit --seq-len "
                                 f"tokens): refused before tokenizing")
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not UTF-8 (byte {e.start} of the line is {raw[e.start:e.start + 1]!r})") \
                    from None
            if text.strip():
                yield n, text


def read_chat_jsonl(path, tok, seq_len, bd, log=print):
    """Chat rows -> (list of (ids, supervised) int32/bool arrays padded to a block multiple, each row's
    number in the file: 1 for its first row, counted before any is dropped, so a held-out choice by
    it does not move with --seq-len). Bad rows raise `file:line: reason`; rows longer than seq_len are
    dropped and reported (count, lines) through log (train_code: rank 0's)."""
    rows, numbers, too_long = [], [], []
    pad = tok.added["<|endoftext|>"]
    for k, (n, line) in enumerate(jsonl_lines(path), 1):
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg})") from None
        msgs = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise InputError(f"{where}: expected an object with a non-empty \"messages\" list")
        ids, sup = [], []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise InputError(f"{where}: message {i} needs a role (system/user/assistant) and string content")
            extra = sorted(k for k, v in m.items() if k not in ("role", "content") and v not in (None, "", [], {}))
            if extra:  # e.g. tool_calls or name: ChatML here renders role and content only, the rest would be lost
                raise InputError(f"{where}: message {i} ({m['role']}) has key(s) {extra}: only role and content "
                                 f"are rendered")
            try:
                m["content"].encode("utf-8")
            except UnicodeEncodeError as e:  # JSON's "\ud800" escapes: no UTF-8 text (it would turn into U+FFFD)
                raise InputError(f"{where}: message {i} ({m['role']}) holds a lone surrogate at character {e.start}") \
                    from None
            if MASK_TOKEN in m["content"]:  # it would tokenize to the mask id: a "position to fill" in x0
                raise InputError(f"{where}: message {i} ({m['role']}) contains the mask token {MASK_TOKEN}")
            if marker := chatml_marker(m["content"]):
                raise InputError(f"{where}: message {i} ({m['role']}) contains the ChatML marker {marker}")
            head = tok.encode(f"<|im_start|>{m['role']}\n")
            body = tok.encode(m["content"] + "<|im_end|>")
            tail = tok.encode("\n")
            ids += head + body + tail
            sup += [False] * len(head) + [m["role"] == "assistant"] * len(body) + [False] * len(tail)
        if not any(sup):
            raise InputError(f"{where}: no assistant message to learn from")
        if len(ids) > seq_len:
            too_long.append(n)
            continue
        L = -(-len(ids) // bd) * bd
        rows.append((np.array(ids + [pad] * (L - len(ids)), dtype=np.int32),
                     np.array(sup + [False] * (L - len(ids)), dtype=bool)))
        numbers.append(k)
    if too_long:
        log(f"{path}: dropped {len(too_long)} rows longer than --seq-len {seq_len} tokens "
              f"(lines {too_long[:10]}{' ...' if len(too_long) > 10 else ''})")
    if not rows:
        raise InputError(f"{path}: no usable rows: " + (f"all {len(too_long)} are longer than --seq-len {seq_len} tokens"
                                                        if too_long else "the file has no non-blank line"))
    return rows, numbers


@lru_cache(maxsize=2)
def synthetic_problems(split, n):
    return make_problems(split, n)


def synthetic_tokenizer(n_train, n_merges):
    """Byte-level BPE learned from the first n_train training problems (prompt and body): code_tasks.py's
    bodies are ~2.5x shorter than in bytes (22 tokens instead of 56); ~1 s."""
    return train_bpe([p["prompt"] + p["canonical_solution"] for p in synthetic_problems("train", n_train)], n_merges)


def synthetic_rows(problems, tok, seq_len, bd):
    """code_tasks.py problems -> (ids, supervised) rows in the layout eval_code.py --base decodes: the
    prompt (signature and docstring) is context; the reference body, then <|endoftext|> up to the end of
    its block, are supervised. A problem longer than seq_len is an error (the generator's are < 360 bytes).
    NOTE: the padding is supervised as LLaDA does: visible padding would tell the model where the body
    ends, which decoding never knows; trained that way, the model writes the right body and goes on."""
    eot = tok.added["<|endoftext|>"]
    rows = []
    for p in problems:
        head, body = tok.encode(p["prompt"]), tok.encode(p["canonical_solution"]) + [eot]
        if len(head) + len(body) > seq_len:
            raise InputError(f"{p['task_id']}: {len(head) + len(body)} tokens do not fit --seq-len {seq_len}")
        L = -(-(len(head) + len(body)) // bd) * bd
        ids = head + body + [eot] * (L - len(head) - len(body))
        sup = [False] * len(head) + [True] * (L - len(head))
        rows.append((np.array(ids, dtype=np.int32), np.array(sup, dtype=bool)))
    return rows


class Rows:
    """Training rows for one chunk of the global batch. fetch(n) -> x0 (n, L) long, fixed (n, L) bool
    (True = context, never masked). Row lists come in epochs, as a distributed sampler deals them:
    each epoch is one seeded permutation of all rows, the same for every chunk, padded with its first
    rows to whole groups of `group` rows (a micro-batch) per chunk; chunk c of C takes every C-th group
    from c on, and a fetch goes on where the last one stopped, so every row is drawn once an epoch
    (a padding row twice) and every chunk is in the same epoch. bucket=W: each window of W rows
    of the permutation is sorted by length before it is cut into groups, and the groups are shuffled,
    so a micro-batch's rows are about equally long (the losses cut the rest, relay.used_width; on
    code_tasks.py's problems W = a tenth of them) while consecutive micro-batches are not. A token
    stream: random windows. state() is the data position, saved in checkpoints."""

    def __init__(self, data, seq_len, seed, chunk, pad_id, device, bucket=0, chunks=1, group=1):
        if not isinstance(data, np.ndarray) and len(data) < chunks * group:
            raise InputError(f"{len(data)} rows cannot be dealt to {chunks} chunks of the batch in groups of {group}: "
                             f"give more rows or a smaller --batch-size")
        self.data, self.L, self.pad, self.device = data, seq_len, pad_id, device
        self.seed, self.chunk, self.chunks, self.bucket, self.group = seed, chunk, chunks, bucket, group
        self.rewind()

    def rewind(self):
        """Back to the start: epoch 0, its first row (and the token stream's first window)."""
        self.rng = np.random.default_rng([self.seed, self.chunk])  # the token stream's windows
        self.epoch, self.pos, self.order = 0, 0, None

    def state(self):
        return {"epoch": self.epoch, "pos": self.pos, "rng": self.rng.bit_generator.state, "n": len(self.data)}

    def load_state(self, s):
        """Go on from state(); a position in data of another size (the file changed since) is refused."""
        if s.get("n", len(self.data)) != len(self.data):  # ("n" is absent in older checkpoints)
            raise InputError(f"the checkpoint's data position is in {s['n']:,} "
                             f"{'tokens' if isinstance(self.data, np.ndarray) else 'rows'}, the data now has "
                             f"{len(self.data):,}: resume with the data it was trained on")
        self.epoch, self.pos, self.order = s["epoch"], s["pos"], None
        self.rng.bit_generator.state = s["rng"]

    def epoch_order(self):
        """This chunk's rows of the current epoch, in the order they are drawn."""
        rng, g = np.random.default_rng([self.seed, self.epoch]), self.group
        perm = rng.permutation(len(self.data))
        # as a distributed sampler pads: the first rows again, up to a whole number of groups per chunk,
        # so that every chunk's share is as long and all chunks start each epoch at the same step
        perm = np.resize(perm, -(-len(perm) // (g * self.chunks)) * g * self.chunks)
        if self.bucket:  # windows a whole number of groups long, each sorted by length
            lengths, w = np.array([len(ids) for ids, _ in self.data]), -(-self.bucket // g) * g
            windows = np.split(perm, range(w, len(perm), w))
            perm = np.concatenate([p[np.argsort(lengths[p], kind="stable")] for p in windows])
        groups = np.split(perm, range(g, len(perm), g))
        if self.bucket:
            groups = [groups[i] for i in rng.permutation(len(groups))]
        return np.concatenate(groups[self.chunk % self.chunks::self.chunks])  # (a held-out stream's chunk id: a seed)

    def pick(self, n):
        """The next n row indices of this chunk's share of the epochs."""
        out = []
        while len(out) < n:
            if self.order is None:
                self.order = self.epoch_order()
            take = self.order[self.pos:self.pos + n - len(out)]
            out.extend(take.tolist())
            self.pos += len(take)
            if self.pos >= len(self.order):  # the epoch is over: the next one is another permutation
                self.epoch, self.pos, self.order = self.epoch + 1, 0, None
        return out

    def __call__(self, n):
        if isinstance(self.data, np.ndarray):  # a token stream: random windows, token 0 is context
            i = self.rng.integers(0, len(self.data) - self.L, size=n)
            x0 = np.stack([self.data[j:j + self.L] for j in i])
            fixed = np.zeros_like(x0, dtype=bool)
            fixed[:, 0] = True
        else:  # chat rows, right-padded to L (padding is context)
            x0 = np.full((n, self.L), self.pad, dtype=np.int32)
            fixed = np.ones((n, self.L), dtype=bool)
            for r, j in enumerate(self.pick(n)):
                ids, sup = self.data[j]
                x0[r, :len(ids)], fixed[r, :len(ids)] = ids, ~sup
        return (torch.from_numpy(x0).long().to(self.device), torch.from_numpy(fixed).to(self.device))


def data_digest(data):
    """sha256 of training data as it is fed (rows of ids and supervision, or a token stream): a resumed run
    refuses data that changed since, even at the same size."""
    h = hashlib.sha256()
    for ids, sup in ([(data, np.zeros(0, bool))] if isinstance(data, np.ndarray) else data):
        h.update(len(ids).to_bytes(8, "little") + np.ascontiguousarray(ids).tobytes() + sup.tobytes())
    return h.hexdigest()


def held_out_signatures(val_text, n):
    """The first n `def name(...):` lines (with their docstring's first line) of held-out files."""
    out = []
    for m in re.finditer(r'^def [a-z_]\w*\([^)\n]*\)(?: -> [^:\n]+)?:\n(?:    """[^\n]*\n)?', val_text, re.M):
        out.append(m.group(0))
        if len(out) == n:
            break
    return out


def main():
    p = argparser(__doc__)
    p.add_argument("--check", help="a chat JSONL file to validate")
    p.add_argument("--seq-len", type=positive_int, default=2048, help="--check: longest row kept, in tokens")
    p.add_argument("--data-dir", default="data", help="cache of the tokenized standard library")
    args = p.parse_args()
    tok = byte_tokenizer()
    if args.check:
        rows, _ = read_chat_jsonl(args.check, tok, args.seq_len, 32)  # the first bad row: one line (run_cli)
        print(f"{args.check}: {len(rows)} usable rows, {sum(int(s.sum()) for _, s in rows)} supervised tokens")
    else:
        d = load_stdlib(tok, args.data_dir)
        print(f"standard library: {len(d['train']):,} training tokens, {len(d['val']):,} held out "
              f"({len(d['val_files'])} files)")


if __name__ == "__main__":
    run_cli(main)
