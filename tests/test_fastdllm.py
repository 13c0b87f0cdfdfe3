"""Fast-dLLM v2 side of model.py and checkpoint.py: block masks, the loader against transformers, tampered
checkpoints, save/load round trip, and the tiktoken tokenizer against HF tokenizers."""
import json
import os

import pytest
import torch

from checkpoint import from_pretrained, save_pretrained
from model import block_mask
from tokenizer import byte_tokenizer, load_tokenizer


def test_block_mask_from_definition():
    L, bd = 12, 4
    m = block_mask(L, bd)
    for i in range(L):
        for j in range(L):
            assert m[i, j] == (j // bd <= i // bd)
    d = block_mask(L, bd, doubled=True)
    assert d.shape == (2 * L, 2 * L)
    for i in range(2 * L):
        for j in range(2 * L):
            bi, bj = (i % L) // bd, (j % L) // bd
            if i < L and j < L:
                want = bi == bj  # noisy block: itself only among noisy tokens
            elif i < L:
                want = bj < bi  # noisy -> clean: strictly earlier clean blocks
            elif j < L:
                want = False  # clean never sees noisy
            else:
                want = bj <= bi  # clean: block-causal
            assert d[i, j] == want, (i, j)


def test_block_mask_is_default_and_cache_matches_full(tiny_llm):
    """model(idx) uses the block-causal pattern, and a cached forward of the last block equals the
    full forward's rows."""
    from model import KVCache
    idx = torch.randint(0, 60, (2, 24))
    full, _ = tiny_llm(idx)
    explicit, _ = tiny_llm(idx, attn_mask=block_mask(24, 8))
    torch.testing.assert_close(full, explicit)
    bidir, _ = tiny_llm(idx, attn_mask=torch.ones(24, 24, dtype=torch.bool))
    assert not torch.allclose(full[:, :16], bidir[:, :16])  # the default is not bidirectional
    cache = KVCache(tiny_llm.cfg.n_layer, 24)
    tiny_llm(idx[:, :16], kv_cache=cache, commit=True)
    tail, _ = tiny_llm(idx[:, 16:], kv_cache=cache)
    assert cache.len == 16
    torch.testing.assert_close(tail, full[:, 16:], atol=1e-5, rtol=1e-5)
    cache = KVCache(tiny_llm.cfg.n_layer, 12)  # a prefix off the block boundary: queries 4-7 share block 0
    tiny_llm(idx[:, :4], kv_cache=cache, commit=True)
    default, _ = tiny_llm(idx[:, 4:12], kv_cache=cache)
    torch.testing.assert_close(default, tiny_llm(idx[:, 4:12], kv_cache=cache, attn_mask=block_mask(12, 8, q0=4))[0])


def hf_checkpoint(tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    c = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                                 tie_word_embeddings=tie, max_position_embeddings=256)
    hf = transformers.Qwen2ForCausalLM(c).eval()
    d = str(tmp_path / f"qwen_tie{tie}")
    hf.save_pretrained(d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg |= {"bd_size": 1, "mask_token_id": 95}  # block size 1 = plain causal attention, as in the AR model
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    return hf, d


@pytest.mark.parametrize("tie", [True, False])
def test_loader_matches_transformers(tmp_path, tie):
    hf, d = hf_checkpoint(tmp_path, tie)
    model = from_pretrained(d, dtype=torch.float32)
    assert model.cfg.tie_embeddings == tie and (model.lm_head is None) == tie
    idx = torch.randint(0, 95, (2, 40))
    with torch.no_grad():
        ref = hf(idx).logits
        ours, _ = model(idx)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def tamper(d, fn):
    from safetensors.torch import load_file, save_file
    sd = load_file(os.path.join(d, "model.safetensors"))
    fn(sd)
    save_file(sd, os.path.join(d, "model.safetensors"))


def test_tampered_checkpoints_name_the_tensor(tmp_path):
    _, d = hf_checkpoint(tmp_path, True)
    tamper(d, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        from_pretrained(d)
    _, d = hf_checkpoint(tmp_path / "b", True)
    tamper(d, lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    with pytest.raises(ValueError, match="unexpected.*model.layers.0.extra.weight"):
        from_pretrained(d)
    _, d = hf_checkpoint(tmp_path / "c", True)
    tamper(d, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(63)))
    with pytest.raises(ValueError, match=r"mis-shaped.*model.norm.weight: \(63,\)"):
        from_pretrained(d)
    _, d = hf_checkpoint(tmp_path / "e", True)
    tamper(d, lambda sd: sd.__setitem__("lm_head.weight", torch.zeros(96, 64)))  # tied, but different
    with pytest.raises(ValueError, match="lm_head.weight"):
        from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(str(tmp_path / "empty"))
    _, d = hf_checkpoint(tmp_path / "f", True)
    shard = os.path.join(d, "model.safetensors")  # cut short, as an interrupted copy leaves it
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        from_pretrained(d)


def test_save_load_round_trip_with_relay(tmp_path, tiny_llm):
    torch.nn.init.normal_(tiny_llm.relay.norm.weight)
    save_pretrained(tiny_llm, str(tmp_path / "m"))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"model.relay_layer_norm.weight", "model.relay_layer_norm.bias"} <= names
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    cfg = json.load(open(tmp_path / "m" / "config.json"))
    assert cfg["use_relay"] is True and cfg["bd_size"] == 8
    back = from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    assert back.cfg == tiny_llm.cfg
    for (k, a), (_, b) in zip(tiny_llm.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


def build_hf_tokenizer(tmp_path):
    tk = pytest.importorskip("tokenizers")
    from tokenizer import QWEN2_PATTERN
    tok = tk.Tokenizer(tk.models.BPE())
    tok.normalizer = tk.normalizers.NFC()
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(QWEN2_PATTERN), behavior="isolated"),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = tk.decoders.ByteLevel()
    corpus = [open(__file__, encoding="utf-8").read(), open(os.path.join(os.path.dirname(__file__), "..", "tokenizer.py"),
                                                            encoding="utf-8").read(),
              "naïve café — 日本語のテキスト, emoji 🙂🚀, Ünïcödé\n\n\t\tdef f(x):\n    return x ** 2\n"] * 3
    trainer = tk.trainers.BpeTrainer(vocab_size=600, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    d = tmp_path / "tok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    json.dump({"|<MASK>|": tok.get_vocab_size()}, open(d / "added_tokens.json", "w"))
    tok.add_tokens(["|<MASK>|"])
    return tok, str(d)


TEXTS = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "Hello, World!  It's   spaced\t\ttabs\n\n\n\nnewlines   \n  trailing   ",
    "naïve café (NFD: nai\u0308ve cafe\u0301) — 日本語のテキスト; emoji 🙂🚀👩‍💻; Ünïcödé 12345 3.14159",
    "<|im_start|>user\nWrite code<|im_end|>\n<|im_start|>assistant\n|<MASK>||<MASK>|x<|endoftext|>",
    "I'LL we'RE they've   'd x=[1,2,3]{'a': \"b\"} # comment\r\n\r\nwindows\rline",
    "",
]


def test_tokenizer_matches_hf_tokenizers(tmp_path):
    hf, d = build_hf_tokenizer(tmp_path)
    ours = load_tokenizer(d)
    assert ours.mask_id == hf.token_to_id("|<MASK>|")
    for text in TEXTS + [open(__file__, encoding="utf-8").read()]:
        want = hf.encode(text).ids
        assert ours.encode(text) == want, text
        assert ours.decode(want) == hf.decode(want, skip_special_tokens=False)


def test_skipping_special_tokens_keeps_the_added_ones_that_are_not(tmp_path):
    """Qwen2.5 adds <tool_call> and others with "special": false: skip_special drops only the special ones."""
    hf, d = build_hf_tokenizer(tmp_path)
    tk = pytest.importorskip("tokenizers")
    hf.add_tokens([tk.AddedToken("<tool_call>", special=False, normalized=False)])
    hf.save(os.path.join(d, "tokenizer.json"))
    ours = load_tokenizer(d)
    ids = hf.encode("x<tool_call>y<|im_end|>").ids
    assert ours.encode("x<tool_call>y<|im_end|>") == ids
    for skip in (False, True):
        assert ours.decode(ids, skip_special=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids, skip_special=True) == "x<tool_call>y"


@pytest.mark.parametrize("part, value", [
    ("pre_tokenizer", {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}),
    ("pre_tokenizer", {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Removed", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}),
    ("normalizer", {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}),
])
def test_a_tokenizer_this_code_cannot_reproduce_is_refused(tmp_path, part, value):
    """Other ids than the tokenizers library's would go unnoticed: other pre-tokenizers and normalizers raise."""
    _, d = build_hf_tokenizer(tmp_path)
    path = os.path.join(d, "tokenizer.json")
    spec = json.load(open(path, encoding="utf-8"))
    spec[part] = value
    json.dump(spec, open(path, "w", encoding="utf-8"))
    with pytest.raises(ValueError, match=f"tokenizer.json: .*{part.replace('_', '-')}"):
        load_tokenizer(d)


def test_a_chat_turn_renders_as_qwen_template_does():
    """Qwen2.5's template (Fast-dLLM v2's too) adds its default system message to a lone user turn."""
    from tokenizer import QWEN_SYSTEM, Tokenizer
    assert Tokenizer.chat("hi") == f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n" \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert Tokenizer.chat("hi", system="") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_byte_tokenizer_round_trip():
    tok = byte_tokenizer()
    text = tok.chat("héllo 🙂")
    ids = tok.encode(text)
    assert ids[0] == tok.added["<|im_start|>"] and tok.decode(ids) == text
    assert tok.decode([5000]) == "<|id:5000|>"  # out-of-vocabulary ids from a random model stay visible
    assert tok.decode([65, 5000, tok.stop_ids[0]], skip_special=True) == "A<|id:5000|>"  # even when skipping specials


def test_saved_byte_tokenizer_loads_and_matches_hf(tmp_path):
    from tokenizer import save_byte_tokenizer
    save_byte_tokenizer(str(tmp_path))
    text = "<|im_start|>user\ndéf f(x):\n   return 🙂<|im_end|>|<MASK>|"
    ids = byte_tokenizer().encode(text)
    assert load_tokenizer(str(tmp_path)).encode(text) == ids
    tk = pytest.importorskip("tokenizers")
    assert tk.Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text).ids == ids


def test_bpe_learned_from_problems_round_trips_saves_and_treats_unseen_values_alike(tmp_path):
    from code_tasks import make_problems
    from tokenizer import save_tokenizer, train_bpe
    text = lambda p: p["prompt"] + p["canonical_solution"]
    train = [text(p) for p in make_problems("train", 300)]
    tok = train_bpe(train, 200)
    assert len(tok.merges) == 200 and tok.merges == train_bpe(train, 200).merges  # deterministic
    test = [text(p) for p in make_problems("test", 50)]  # held out: unseen parameter values
    assert all(tok.decode(tok.encode(t)) == t for t in test)
    assert sum(map(len, map(tok.encode, test))) < 0.5 * sum(map(len, map(str.encode, test)))  # merges apply
    save_tokenizer(tok, str(tmp_path))
    back = load_tokenizer(str(tmp_path))
    assert all(back.encode(t) == tok.encode(t) for t in test + [tok.chat("héllo 🙂")])
    assert (back.mask_id, back.stop_ids, back.n_vocab) == (tok.mask_id, tok.stop_ids, tok.n_vocab) == \
        (256 + 200 + 3, [256 + 200 + 2, 256 + 200], 256 + 200 + 4)
    # a quoted character or a number is cut the same way whatever its value, seen in training or not
    shape = lambda s: [len(tok.decode([i])) for i in tok.encode(s)]
    assert len({tuple(shape(f"s.replace('{c}', '')")) for c in "abcdefghijklmnopqrstuvwxyz"}) == 1
    assert len({tuple(shape(f"x % {k} == 0")) for k in range(10, 100)}) == 1
    tk = pytest.importorskip("tokenizers")
    assert all(tk.Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(t).ids == tok.encode(t) for t in test)


def test_sharded_export_in_another_dtype_loads_and_replaces_the_old_layout(tmp_path, tiny_llm):
    from safetensors import safe_open
    d, sd = tmp_path / "m", tiny_llm.state_dict()
    total = sum(v.numel() for v in sd.values()) * 4
    save_pretrained(tiny_llm, str(d), max_shard_bytes=total // 3)
    index = json.load(open(d / "model.safetensors.index.json"))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == total and not (d / "model.safetensors").exists()
    for f in files:  # every tensor in the shard the index names; no shard over the limit but a lone tensor
        with safe_open(str(d / f), "pt") as h:
            keys = set(h.keys())
            assert keys == {k for k, v in index["weight_map"].items() if v == f}
            size = sum(h.get_tensor(k).nbytes for k in keys)
        assert size <= total // 3 or len(keys) == 1
    assert sorted(os.listdir(d)) == sorted([*files, "config.json", "model.safetensors.index.json"])  # no .tmp
    back = from_pretrained(str(d), dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(sd.values(), back.state_dict().values()))

    tiny_llm.hf_config = {"torch_dtype": "bfloat16"}  # Fast-dLLM v2's config.json: export in its dtype
    (d / "model-00002-of-00009.safetensors.tmp").write_bytes(b"left by a crash")
    save_pretrained(tiny_llm, str(d))
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]  # shards, index, leftovers: gone
    assert json.load(open(d / "config.json"))["torch_dtype"] == "bfloat16"
    with safe_open(str(d / "model.safetensors"), "pt") as h:
        assert {h.get_tensor(k).dtype for k in h.keys()} == {torch.bfloat16}
    back = from_pretrained(str(d), dtype=torch.float32)
    assert all(torch.equal(a.bfloat16().float(), b) for a, b in zip(sd.values(), back.state_dict().values()))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        save_pretrained(tiny_llm, str(d), dtype=torch.float8_e4m3fn)
    with torch.no_grad():
        tiny_llm.norm.weight[0] = 1e6
    with pytest.raises(ValueError, match=r"\['model.norm.weight'\] exceed float16's range"):
        save_pretrained(tiny_llm, str(d), dtype=torch.float16)


@pytest.mark.parametrize("first,then", [("shards", "one"), ("one", "shards"), ("shards", "shards")])
def test_an_export_that_crashes_halfway_fails_to_load_rather_than_mix_two(tmp_path, tiny_llm, monkeypatch, first,
                                                                          then):
    """Shards -> one file, back, and shards over shards, the second export killed after its first
    rename: no loader may then read the old weights (or a mix) as if they were the new export."""
    import checkpoint
    d = str(tmp_path / "m")
    limit = {"one": 10**9, "shards": sum(v.numel() for v in tiny_llm.state_dict().values()) * 4 // 3}
    first, then = limit[first], limit[then]
    save_pretrained(tiny_llm, d, max_shard_bytes=first)
    with torch.no_grad():
        tiny_llm.norm.weight.add_(1.0)
    replace, calls = os.replace, []

    def dies(a, b):
        calls.append(b)
        if len(calls) > 1:
            raise OSError("killed")
        replace(a, b)
    monkeypatch.setattr(checkpoint.os, "replace", dies)
    with pytest.raises(OSError, match="killed"):
        save_pretrained(tiny_llm, d, max_shard_bytes=then)
    monkeypatch.undo()
    try:  # a single file moves in one rename: then the new weights may load (under the old config.json)
        loaded = from_pretrained(d, dtype=torch.float32).norm.weight
    except (FileNotFoundError, ValueError):
        loaded = None
    assert (loaded is None) != (then == limit["one"]) and (loaded is None or torch.equal(loaded, tiny_llm.norm.weight))
    save_pretrained(tiny_llm, d, max_shard_bytes=then)  # the next export cleans up
    assert torch.equal(from_pretrained(d, dtype=torch.float32).norm.weight, tiny_llm.norm.weight)
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]


def test_a_sudoku_model_has_no_fast_dllm_layout(tmp_path):
    from model import ModelConfig, Transformer
    with pytest.raises(ValueError, match="embed_pos.weight: no Fast-dLLM v2 / Qwen2 name"):
        save_pretrained(Transformer(ModelConfig(n_embd=32, n_head=2, n_kv_head=2, n_ffn=64, n_pos=81)), str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()  # refused before anything was written


def test_transformers_reads_a_sharded_export(tmp_path):
    hf, d = hf_checkpoint(tmp_path, tie=False)
    out = tmp_path / "export"
    save_pretrained(from_pretrained(d, dtype=torch.float32), str(out), max_shard_bytes=100_000)
    assert len(json.load(open(out / "model.safetensors.index.json"))["weight_map"]) == len(hf.state_dict())
    import transformers
    back = transformers.Qwen2ForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
    for k, v in hf.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llm):
    idx = torch.randint(0, 60, (2, 16))
    tiny_llm.train()
    grads = []
    for ckpt in (False, True):
        tiny_llm.grad_ckpt = ckpt
        tiny_llm.zero_grad()
        logits, _ = tiny_llm(idx)
        logits.logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in tiny_llm.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# the tokenizer's own rules, pinned (the comparison with transformers builds its reference from these same rules)
def test_qwen2_pre_tokenizer_splits_digits_one_by_one():
    import regex
    from tokenizer import QWEN2_PATTERN
    assert regex.findall(QWEN2_PATTERN, "x=2024 it's") == ["x", "=", "2", "0", "2", "4", " it", "'s"]


def edited_byte_tokenizer(path, edit):
    from tokenizer import save_byte_tokenizer
    save_byte_tokenizer(str(path))
    spec = json.loads((path / "tokenizer.json").read_text())
    edit(spec)
    (path / "tokenizer.json").write_text(json.dumps(spec))
    return load_tokenizer(str(path))


def test_an_added_token_without_a_special_flag_is_special(tmp_path):
    """tokenizers' default for an added token's "special" is true: decode(skip_special) drops it."""
    tok = edited_byte_tokenizer(tmp_path, lambda s: [t.pop("special") for t in s["added_tokens"]])
    assert tok.decode([65, tok.added["<|endoftext|>"]], skip_special=True) == "A"


def test_no_normalizer_means_no_nfc(tmp_path):
    tok = edited_byte_tokenizer(tmp_path, lambda s: s.update(normalizer=None))
    assert tok.encode("e\u0301") == list("e\u0301".encode())


def test_the_longest_added_token_wins():
    from tokenizer import Tokenizer
    tok = Tokenizer(byte_tokenizer().enc, {"<x>": 300, "<x>y": 301}, range(256))
    assert tok.encode("<x>y<x>") == [301, 300]


def test_bpe_merges_a_pair_that_is_the_only_one():
    from tokenizer import train_bpe
    assert train_bpe(["ab", "ab"], 3).merges == [(b"a", b"b")]
