"""
checkpoint.py — weights on disk, in two formats:

- training checkpoints (one .pt file: model, optimizer, step, config, args, RNG, data position),
  written atomically with a sha256 digest of every tensor and the kind of model they hold (sudoku
  or code), and the small fp16 exports shared in checkpoints/;
- Fast-dLLM v2 (arXiv 2509.26328) / Qwen2 directories: config.json and (sharded) safetensors under
  Hugging Face names, read and written through one strict name table (NOTES.md §5).

    python checkpoint.py PATH     # describe a training checkpoint (.pt) or a Fast-dLLM v2 / Qwen2 directory

The network itself is model.py.
"""
import errno
import hashlib
import json
import os
import re
import zipfile
from dataclasses import asdict, fields

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import ModelConfig, Transformer
from runs import InputError, argparser, read_json, run_cli, written_whole
from tokenizer import MASK_TOKEN, find_token, load_tokenizer

# ---------------------------------------------------------------------------------------------
# training checkpoints

KINDS = ("sudoku", "code")  # what a training checkpoint holds: train_sudoku.py's or train_code.py's model


def tensor_digests(obj, prefix=""):
    """{"model/embed_tokens.weight": sha256 hex, ...} of every tensor in a nested dict/list: bytes,
    dtype and shape. Stored in the checkpoint, so zeroed or flipped bytes are caught at load time."""
    out = {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous().reshape(-1)
            h = hashlib.sha256(f"{t.dtype}{tuple(v.shape)}".encode())
            h.update(t.view(torch.uint8).numpy())
            out[name] = h.hexdigest()
        elif isinstance(v, (dict, list, tuple)):
            out |= tensor_digests(v, name + "/")
    return out


def save_checkpoint(obj, path):
    """torch.save through a temp file + rename: a crash or a full disk never leaves a half-written
    checkpoint, and the previous one stays. Adds "sha256": tensor_digests(obj), which
    load_checkpoint verifies. Training checkpoints carry "kind" (KINDS) and "objective"."""
    if "kind" in obj and obj["kind"] not in KINDS:
        raise ValueError(f"checkpoint kind {obj['kind']!r} is not one of {KINDS}")
    obj = {**obj, "sha256": tensor_digests({k: v for k, v in obj.items() if k != "sha256"})}
    try:
        # unbuffered: a full disk raises OSError(ENOSPC) from the write itself (through a buffer,
        # torch reports it as an opaque "unexpected pos" RuntimeError)
        with written_whole(path) as tmp, open(tmp, "wb", buffering=0) as f:
            torch.save(obj, f)
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on {path}: the checkpoint was not written "
                                        f"(the previous one, if any, is intact)") from e
        raise


def checkpoint_kind(ck):
    """"sudoku" or "code". Checkpoints before the "kind" field: a Sudoku model attends over the whole
    board (bd_size 0), a code model block by block (bd_size > 0)."""
    return ck.get("kind") or ("code" if ck["config"].get("bd_size") else "sudoku")


def damaged(path):
    """torch.save writes a zip archive: a file that is not one, or holds a member that fails its CRC, is damaged."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is not None
    except (zipfile.BadZipFile, EOFError):
        return True
    except OSError:  # unreadable: that says nothing about its bytes
        return False


def load_checkpoint(path, device="cpu", kind=None):
    """A training checkpoint (one file: model, optimizer, step, config, args, RNG, data position).
    Verifies the tensor digests when the file has them (older files have none); kind: raise unless
    the checkpoint holds that kind of model."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: a directory; a training checkpoint is one file (a Fast-dLLM v2 / Qwen2 "
                                f"directory loads with from_pretrained: sampler.py, train_code.py --init-from)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # a damaged file, or another failure (a device, memory, permissions): say which
        what = "corrupt checkpoint, truncated or not one at all" if damaged(path) else "cannot read the checkpoint"
        raise InputError(f"{path}: {what} ({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict) or not {"model", "config", "step"} <= set(ck):
        raise InputError(f"{path}: not a training checkpoint of this repository (needs model, config, step)")
    if "sha256" in ck:
        got = tensor_digests({k: v for k, v in ck.items() if k != "sha256"})
        if bad := sorted(k for k in set(got) | set(ck["sha256"]) if got.get(k) != ck["sha256"].get(k)):
            raise InputError(f"{path}: corrupt checkpoint: {len(bad)} tensor(s) do not match the sha256 "
                             f"recorded when it was saved: {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    if kind is not None and checkpoint_kind(ck) != kind:
        raise InputError(f"{path} holds a {checkpoint_kind(ck)} model (train_{checkpoint_kind(ck)}.py), "
                         f"not a {kind} model")
    return ck


def load_model(path, device="cpu", kind=None):
    """The evaluated weights (EMA when the run kept one) of a training checkpoint, in eval mode.
    kind: "sudoku" or "code" to refuse the other one. Returns (model, checkpoint dict)."""
    ck = load_checkpoint(path, device, kind)
    names = {f.name for f in fields(ModelConfig)}
    if unknown := sorted(set(ck["config"]) - names):
        raise InputError(f"{path}: config has fields this model.py does not know: {unknown}")
    model = Transformer(ModelConfig(**ck["config"])).to(device)
    load_state(model, ck.get("ema") or ck["model"], path)
    return model.eval(), ck


def export_weights(path, dtype=torch.float16):
    """A training checkpoint -> a small one for sharing: the evaluated (EMA) weights in `dtype`, with
    config, step, args, kind, objective and training figures, no optimizer or buffer. load_model() reads it (fp32)."""
    ck = load_checkpoint(path)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in (ck.get("ema") or ck["model"]).items()}
    return {"model": sd, "config": ck["config"], "step": ck["step"], "args": ck.get("args"),
            "kind": checkpoint_kind(ck), "objective": ck.get("objective", (ck.get("args") or {}).get("objective")),
            "exported_from": os.path.basename(path), "dtype": str(dtype), "trained": ck.get("trained")}


def config_diff(cfg, ck):
    """The fields where checkpoint dict `ck`'s config differs from ModelConfig `cfg`: {field: (ours, theirs)}."""
    return {k: (v, ck["config"].get(k)) for k, v in asdict(cfg).items() if ck["config"].get(k) != v}


def load_state(model, sd, where, assign=False):
    """Strict load: missing, unexpected or mis-shaped tensors raise one error that lists them all.
    assign: the model takes sd's tensors themselves (a model built on the meta device)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: {tuple(sd[k].shape)} in file vs {tuple(v.shape)} in model"
              for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise InputError(f"{where} does not match the model: missing {missing}, unexpected {unexpected}, "
                         f"mis-shaped {shapes}")
    model.load_state_dict(sd, assign=assign)


# ---------------------------------------------------------------------------------------------
# Fast-dLLM v2 / Qwen2 checkpoint directories (NOTES.md §5)

# our parameter name -> Hugging Face Qwen2 name; {i} = layer index. Relay tensors use the authors'.
HF_NAMES = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.self_attn.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.self_attn.q_proj.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "layers.{i}.self_attn.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.self_attn.k_proj.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "layers.{i}.self_attn.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.self_attn.v_proj.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "layers.{i}.self_attn.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.post_attention_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "relay.norm.weight": "model.relay_layer_norm.weight",
    "relay.norm.bias": "model.relay_layer_norm.bias",
}


SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"  # a directory's entry points, one of them


def hf_name(name):
    key = re.sub(r"^layers\.\d+\.", "layers.{i}.", name)
    if key not in HF_NAMES:
        raise InputError(f"{name}: no Fast-dLLM v2 / Qwen2 name for this parameter (a Sudoku model has no "
                         f"such layout)")
    return HF_NAMES[key].replace("{i}", name.split(".")[1]) if "{i}" in key else HF_NAMES[key]


def shard_names(path):
    """The safetensors files of a checkpoint directory: model.safetensors, or the shards that
    model.safetensors.index.json names. NOTE: a shard name must stay inside the directory; it is
    checked by name (not resolved), so a Hugging Face cache's symlinked snapshots still load."""
    index = os.path.join(path, INDEX)
    if not os.path.isfile(index):
        if os.path.isfile(os.path.join(path, SINGLE)):
            return [SINGLE]
        raise FileNotFoundError(f"{path}: neither {SINGLE} nor {INDEX}")
    wm = read_json(index).get("weight_map")
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise InputError(f"{index}: weight_map must be an object of tensor name -> shard file name")
    outside = sorted({v for v in wm.values() if os.path.isabs(v) or os.path.normpath(v).split(os.sep)[0] == os.pardir})
    if outside:
        raise InputError(f"{index}: shard(s) {outside} are outside the checkpoint directory {path}")
    return sorted(set(wm.values()))


def check_tokenizer(model, tok, path):
    """A checkpoint's tokenizer must fit its model: an id past the vocabulary would fail in the embedding,
    and another mask id would decode with a real token as the mask. Raises naming both files' values."""
    if tok.n_vocab > model.cfg.vocab_size:
        raise InputError(f"{path}: tokenizer.json's ids go up to {tok.n_vocab - 1}, past the model's vocabulary "
                         f"(config.json vocab_size {model.cfg.vocab_size})")
    if tok.mask_id is not None and tok.mask_id != model.cfg.mask_id:
        raise InputError(f"{path}: the tokenizer's {MASK_TOKEN} is id {tok.mask_id}, config.json's mask_token_id "
                         f"{model.cfg.mask_id}")


def meta_pretrained(path):
    """A checkpoint directory's model on the meta device (no weight read, no memory) and its tokenizer, checked
    against each other: what a run checks of several checkpoints before it loads and runs the first."""
    cfg, hf_cfg = read_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.hf_config, tok = hf_cfg, load_tokenizer(path)
    check_tokenizer(model, tok, path)
    return model, tok


def load_pretrained(path, *, device="cpu", dtype=torch.bfloat16):
    """from_pretrained and the directory's tokenizer, checked against each other -> (model, tokenizer)."""
    model, tok = from_pretrained(path, device=device, dtype=dtype), load_tokenizer(path)
    check_tokenizer(model, tok, path)
    return model, tok


def read_config(path):
    """A checkpoint directory's config.json -> (ModelConfig, the dict as read); the mask id comes from the
    tokenizer where config.json has none. No weight is read: a checkpoint can be checked before it is loaded."""
    if os.path.isfile(path):
        raise InputError(f"{path} is a file; expected a Fast-dLLM v2 / Qwen2 checkpoint directory (train_code.py "
                         f"exports one as OUT_DIR/hf; a train_sudoku.py checkpoint is evaluated with "
                         f"`train_sudoku.py --eval-only --checkpoint FILE`)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (expected a Fast-dLLM v2 / Qwen2 checkpoint directory)")
    hf_cfg = read_json(cfg_path)
    cfg = ModelConfig.from_hf(hf_cfg, cfg_path)
    if cfg.mask_id < 0:  # Fast-dLLM v2 keeps the mask token in the tokenizer, not in config.json
        cfg.mask_id = find_token(path, MASK_TOKEN)
    if not 0 <= cfg.mask_id < cfg.vocab_size:  # an embedding lookup would fail only at decoding time
        raise InputError(f"{path}: mask token id {cfg.mask_id} (config.json mask_token_id or the tokenizer's "
                         f"{MASK_TOKEN}) is outside the vocabulary (vocab_size {cfg.vocab_size})")
    return cfg, hf_cfg


def from_pretrained(path, *, device="cpu", dtype=torch.bfloat16):
    """A Fast-dLLM v2 (or Qwen2) directory -> Transformer in eval mode. Reads config.json and
    model.safetensors or model.safetensors.index.json + shards; strict: missing, unexpected,
    mis-shaped or duplicated (in two shards) tensors raise one error naming them. Relay checkpoints:
    use_relay + relay_layer_norm."""
    cfg, hf_cfg = read_config(path)
    shards = shard_names(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    want = {hf_name(k): (k, v.shape) for k, v in model.state_dict().items()}
    sd, seen, unexpected, shapes, twice = {}, {}, [], [], []
    for shard in shards:
        try:
            handle = safe_open(os.path.join(path, shard), framework="pt", device="cpu")
        except Exception as e:  # truncated or not safetensors at all: the library's message names no file
            raise InputError(f"{os.path.join(path, shard)}: not a readable safetensors file ({e})") from None
        with handle as f:
            for name in f.keys():
                if name in seen:  # which copy is right is unknowable: refuse rather than let the last win
                    twice.append(f"{name} in {seen[name]} and {shard}")
                    continue
                seen[name] = shard
                t = f.get_tensor(name)
                if name == "lm_head.weight" and cfg.tie_embeddings and name not in want:
                    sd["@lm_head"] = t  # some exporters write the tied head too; checked below
                elif name not in want:
                    unexpected.append(f"{shard}:{name}")
                elif t.shape != want[name][1]:
                    shapes.append(f"{name}: {tuple(t.shape)} in {shard} vs {tuple(want[name][1])} in the model")
                else:
                    sd[want[name][0]] = t.to(device=device, dtype=dtype)
    tied_head = sd.pop("@lm_head", None)
    missing = sorted(hf for hf, (ours, _) in want.items() if ours not in sd)
    if tied_head is not None and "embed_tokens.weight" in sd and not torch.equal(
            tied_head.to(device=device, dtype=dtype), sd["embed_tokens.weight"]):
        unexpected.append("lm_head.weight (differs from embed_tokens but tie_word_embeddings is true)")
    if missing or unexpected or shapes or twice:
        raise InputError(f"{path} does not match its config.json: missing {missing}, unexpected {unexpected}, "
                         f"mis-shaped {shapes}" + (f", in two shards {twice}" if twice else ""))
    model.load_state_dict(sd, assign=True)
    model.hf_config = hf_cfg
    return model.eval()


def shard_plan(sizes, max_bytes):
    """{file name: tensor names}: tensors in order (a layer's stay together) into files of at most
    max_bytes (a larger tensor gets one of its own), named as Hugging Face names them; one file is SINGLE."""
    shards, size = [[]], 0
    for k, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    n = len(shards)
    return {SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors": keys for i, keys in enumerate(shards)}


DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what a Fast-dLLM v2 / Qwen2 directory is written in
# what an export keeps of the config it was loaded from rather than writing Qwen2's: the class and remote code
# that load it (Fast-dLLM v2: Fast_dLLM_QwenForCausalLM, auto_map to its modeling.py), its length limit
IDENTITY = ("architectures", "model_type", "auto_map", "max_position_embeddings")


def save_pretrained(model, path, dtype=None, max_shard_bytes=5 * 10**9):
    """Write config.json + the weights under Qwen2 / Fast-dLLM v2 names (relay as the authors name it),
    keeping the other keys of the config the model was loaded from. dtype (DTYPES): on disk; default:
    the torch_dtype of that config (bfloat16 for Fast-dLLM v2), else the model's own. Weights above
    max_shard_bytes (Hugging Face's default, "5GB") go to shards model-0000i-of-0000n.safetensors and
    model.safetensors.index.json, as Hugging Face writes them; one shard is converted at a time.
    NOTE: a crash never leaves weights of two exports that load: files are written under temporary
    names and synced, then the old entry points (index, single file) go, the new files move into
    place with config.json last, and the rest of the old layout is removed."""
    params = model.state_dict()
    hf = {k: hf_name(k) for k in params}  # a model with no Fast-dLLM v2 layout fails here, before any write
    loaded = getattr(model, "hf_config", None) or {}
    cfg = {**loaded, **model.cfg.to_hf(), **{k: loaded[k] for k in IDENTITY if k in loaded}}
    if not cfg["use_relay"]:
        cfg.pop("use_relay")
    if dtype is None:
        named = getattr(torch, str(cfg.get("torch_dtype", cfg.get("dtype"))), None)  # "auto", None: not a dtype
        dtype = named if named in DTYPES else next(iter(params.values())).dtype
    if dtype not in DTYPES:
        raise InputError(f"save_pretrained: weights are written in float32, bfloat16 or float16, not {dtype}")
    big = [hf[k] for k, v in params.items() if dtype == torch.float16 and v.abs().max() > torch.finfo(dtype).max]
    if big:
        raise InputError(f"save_pretrained: {big[:3]} exceed float16's range: write bfloat16 or float32")
    for key in {"torch_dtype", "dtype"} & {"torch_dtype", *cfg}:  # newer transformers write "dtype"
        cfg[key] = str(dtype).removeprefix("torch.")
    sizes = {k: v.numel() * dtype.itemsize for k, v in params.items()}
    shards = shard_plan(sizes, max_shard_bytes)
    names = list(shards)
    jsons = {} if len(names) == 1 else {INDEX: {"metadata": {"total_size": sum(sizes.values())}, "weight_map": {
        hf[k]: name for name, keys in shards.items() for k in keys}}}
    jsons["config.json"] = cfg  # last: the loader's first read, written after the weights it describes
    os.makedirs(path, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    for name, keys in shards.items():
        save_file({hf[k]: params[k].detach().to("cpu", dtype).contiguous() for k in keys},
                  os.path.join(path, name + ".tmp"), metadata={"format": "pt"})
        os.chmod(os.path.join(path, name + ".tmp"), 0o666 & ~umask)  # safetensors writes 0600: readable as config.json
    for name, obj in jsons.items():
        with open(os.path.join(path, name + ".tmp"), "w") as f:
            json.dump(obj, f, indent=2)
    for name in [*names, *jsons]:  # on disk before any rename
        fd = os.open(os.path.join(path, name + ".tmp"), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    for f in (INDEX, SINGLE):  # without an entry point a half-moved directory fails to load
        if os.path.exists(os.path.join(path, f)):
            os.remove(os.path.join(path, f))
    for name in [*names, *jsons]:
        os.replace(os.path.join(path, name + ".tmp"), os.path.join(path, name))
    # the rest of an earlier export's other layout, or what a crash left
    layout = re.compile(rf"({re.escape(SINGLE)}|model-\d{{5}}-of-\d{{5}}\.safetensors|{re.escape(INDEX)})(\.tmp)?")
    for f in sorted(f for f in os.listdir(path) if layout.fullmatch(f) and f not in {*names, *jsons}):
        os.remove(os.path.join(path, f))


def main():
    p = argparser(__doc__)
    p.add_argument("path", help="a training checkpoint (.pt) or a Fast-dLLM v2 / Qwen2 directory to load and describe")
    args = p.parse_args()
    if not os.path.exists(args.path):
        p.error(f"{args.path}: no such checkpoint file or directory")
    if os.path.isdir(args.path):
        m = from_pretrained(args.path, dtype=torch.float32)
        print(json.dumps(asdict(m.cfg), indent=1))
    else:  # the digests are checked on the way in
        m, ck = load_model(args.path)
        print(json.dumps(ck["config"], indent=1))
        weights = "EMA and raw" if ck.get("ema") is not None else f"the evaluated ones in {ck['dtype']}, exported from " \
            f"{ck['exported_from']}" if "exported_from" in ck else "as trained"
        print(f"{checkpoint_kind(ck)} model, objective {ck.get('objective')}, step {ck['step']}, weights: {weights}"
              f"{', with optimizer state' if 'optimizer' in ck else ''}, "
              f"{'digests verified' if 'sha256' in ck else 'no digests (older file)'}")
    print(f"{m.num_params() / 1e6:.2f}M parameters, relay {m.relay is not None}")


if __name__ == "__main__":
    run_cli(main)
