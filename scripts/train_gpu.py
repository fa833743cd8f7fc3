#!/usr/bin/env python3
"""Train beacon parameters on a GPU (PyTorch): the method of `crates/beacon-train` for a device machine.

Why this exists: the Rust trainer runs on the CPU only (docs/TRAINING.md, "GPU"), and on 2 cores it buys
~0.4M tokens an hour. A device machine reaches no crate registry and holds no Rust toolchain, but it has
PyTorch, so this script re-implements the *training forward* of the Rust engine (SPEC §2.3–2.7, §3.1:
interleave + full-coverage, sink, beacons of closed windows kept as pre-RoPE K/V, per-window random
ratio, loss on every raw token, no beacons in a sample's last window) and exports a
`beacon.safetensors` the Rust engine loads. `--parity` checks the forward against `beacon eval ppl`
on the CPU (same tokens, same weights, same ratio) before any device time is spent.

Weights come from the default model's GGUF (read with the `gguf` package); the q/k rows stay in the
GGUF's order, so RoPE is the interleaved-pairs form, as the Rust engine uses for GGUF llama models.

Usage (see docs/TRAINING.md "GPU"):
  train_gpu.py --gguf M.gguf --tokens train.u16 --out DIR --deadline-s 480      # train
  train_gpu.py --gguf M.gguf --parity book.u32 --beacon beacon.safetensors --ratio 8 --len 4096
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

TRAINABLE = ("q", "k", "v", "o")


# ----------------------------------------------------------------------------------------------
# Backbone from GGUF
# ----------------------------------------------------------------------------------------------
def gguf_field(reader, key):
    f = reader.fields[key]
    return f.parts[f.data[0]].tolist()[0] if f.data else None


def load_gguf(path):
    """Dequantized f32 tensors (torch layout [out, in]) and the model's settings."""
    import gguf

    r = gguf.GGUFReader(path)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    if arch != "llama":
        sys.exit(f"error: {path}: general.architecture is {arch!r}, this script handles llama only")
    cfg = {
        "layers": int(gguf_field(r, "llama.block_count")),
        "hidden": int(gguf_field(r, "llama.embedding_length")),
        "ffn": int(gguf_field(r, "llama.feed_forward_length")),
        "heads": int(gguf_field(r, "llama.attention.head_count")),
        "kv_heads": int(gguf_field(r, "llama.attention.head_count_kv")),
        "eps": float(gguf_field(r, "llama.attention.layer_norm_rms_epsilon")),
        "theta": float(gguf_field(r, "llama.rope.freq_base")),
        "eos": int(gguf_field(r, "tokenizer.ggml.eos_token_id")),
    }
    tensors = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = [int(x) for x in reversed(list(t.shape))]
        tensors[t.name] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(shape))
    if "output.weight" in tensors:
        sys.exit(f"error: {path}: untied output.weight is not handled")
    cfg["vocab"] = tensors["token_embd.weight"].shape[0]
    cfg["head_dim"] = cfg["hidden"] // cfg["heads"]
    return cfg, tensors


class BeaconModel(torch.nn.Module):
    """Frozen backbone (buffers) + trainable beacon parameters (f32 masters)."""

    def __init__(self, cfg, t, dtype, device):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        c = lambda x: x.to(device=device, dtype=dtype).contiguous()
        self.embed = c(t["token_embd.weight"])
        self.norm = c(t["output_norm.weight"])
        self.layers = []
        for i in range(cfg["layers"]):
            p = f"blk.{i}."
            self.layers.append({
                "ln1": c(t[p + "attn_norm.weight"]), "ln2": c(t[p + "ffn_norm.weight"]),
                "q": c(t[p + "attn_q.weight"]), "k": c(t[p + "attn_k.weight"]),
                "v": c(t[p + "attn_v.weight"]), "o": c(t[p + "attn_output.weight"]),
                "gate": c(t[p + "ffn_gate.weight"]), "up": c(t[p + "ffn_up.weight"]),
                "down": c(t[p + "ffn_down.weight"]),
            })
        # SPEC §1.3: beacon projections start as copies of the backbone's, the embedding as eos's row.
        f32 = lambda x: torch.nn.Parameter(x.to(device=device, dtype=torch.float32).clone())
        self.beacon_embed = f32(t["token_embd.weight"][cfg["eos"]].reshape(1, -1))
        self.bq = torch.nn.ParameterList([f32(t[f"blk.{i}.attn_q.weight"]) for i in range(cfg["layers"])])
        self.bk = torch.nn.ParameterList([f32(t[f"blk.{i}.attn_k.weight"]) for i in range(cfg["layers"])])
        self.bv = torch.nn.ParameterList([f32(t[f"blk.{i}.attn_v.weight"]) for i in range(cfg["layers"])])
        self.bo = torch.nn.ParameterList([f32(t[f"blk.{i}.attn_output.weight"]) for i in range(cfg["layers"])])
        half = cfg["head_dim"] // 2
        self.inv_freq = 1.0 / (cfg["theta"] ** (torch.arange(0, half, dtype=torch.float64) * 2 / cfg["head_dim"]))
        self.device = device
        self._rope = (0, None, None)

    # -- names as in the Rust engine's beacon.safetensors (SPEC §1.1) --
    def beacon_state(self):
        out = {"model.beacon_embed_tokens.weight": self.beacon_embed}
        for i in range(self.cfg["layers"]):
            for n, pl in (("q", self.bq), ("k", self.bk), ("v", self.bv), ("o", self.bo)):
                out[f"model.layers.{i}.self_attn.beacon_{n}_proj.weight"] = pl[i]
        return out

    def load_beacons(self, path):
        from safetensors.torch import load_file

        st = load_file(path)
        for name, p in self.beacon_state().items():
            if name not in st:
                sys.exit(f"error: {path}: missing tensor {name}")
            if tuple(st[name].shape) != tuple(p.shape):
                sys.exit(f"error: {path}: {name} has shape {tuple(st[name].shape)}, expected {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(st[name].to(torch.float32))

    def rope_tables(self, n):
        if self._rope[0] < n:
            m = max(n, 2 * self._rope[0], 4096)
            ang = torch.outer(torch.arange(m, dtype=torch.float64), self.inv_freq)
            self._rope = (m, ang.cos().float().to(self.device), ang.sin().float().to(self.device))
        return self._rope[1], self._rope[2]

    def rope(self, x, start, n):
        """Interleaved-pairs RoPE (GGUF llama row order) at positions start..start+n, in f32."""
        cos, sin = self.rope_tables(start + n)
        cos, sin = cos[start:start + n], sin[start:start + n]
        xf = x.float().unflatten(-1, (-1, 2))
        x0, x1 = xf[..., 0], xf[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
        return out.to(x.dtype)

    def rms(self, x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg["eps"])).to(x.dtype) * w

    def window(self, ids, bslots, mem, mem_len):
        """One window: `ids` [B, T] raw ids (beacon slots hold any id), `bslots` the beacon slot
        indices (LongTensor, may be empty), `mem` per layer (K rotated at its memory positions, V)
        [B, kv, mem_len, d] or None.
        Returns the final hidden states [B, T, D] (before the final norm) and per layer this window's
        pre-RoPE (K, V) [B, kv, T, d]."""
        cfg, dt = self.cfg, self.dtype
        B, T = ids.shape
        H, KV, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
        nb = bslots.numel()
        x = F.embedding(ids, self.embed)
        if nb:
            x = x.index_copy(1, bslots, self.beacon_embed.to(dt).expand(B, nb, -1))
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(T, mem_len + T)
        kvs = []
        for i, L in enumerate(self.layers):
            h = self.rms(x, L["ln1"])
            q, k, v = h @ L["q"].T, h @ L["k"].T, h @ L["v"].T
            if nb:
                hb = h.index_select(1, bslots)
                q = q.index_copy(1, bslots, hb @ self.bq[i].to(dt).T)
                k = k.index_copy(1, bslots, hb @ self.bk[i].to(dt).T)
                v = v.index_copy(1, bslots, hb @ self.bv[i].to(dt).T)
            q = q.view(B, T, H, d).transpose(1, 2)
            k = k.view(B, T, KV, d).transpose(1, 2)
            v = v.view(B, T, KV, d).transpose(1, 2)
            kvs.append((k, v))
            # Memory keys arrive rotated: an entry's position never changes once it is in memory
            # (sink at 0, beacon j at sink + j), so it is rotated once, when its window closes.
            qr, kr = self.rope(q, mem_len, T), self.rope(k, mem_len, T)
            if mem is not None:
                K, V = torch.cat((mem[i][0], kr), 2), torch.cat((mem[i][1], v), 2)
            else:
                K, V = kr, v
            a = F.scaled_dot_product_attention(qr, K, V, attn_mask=mask, enable_gqa=True)
            a = a.transpose(1, 2).reshape(B, T, H * d)
            o = a @ L["o"].T
            if nb:
                o = o.index_copy(1, bslots, a.index_select(1, bslots) @ self.bo[i].to(dt).T)
            x = x + o
            h = self.rms(x, L["ln2"])
            x = x + (F.silu(h @ L["gate"].T) * (h @ L["up"].T)) @ L["down"].T
        return x, kvs

    def logits(self, x):
        return self.rms(x, self.norm) @ self.embed.T


# ----------------------------------------------------------------------------------------------
# The compression-based auto-regression over one batch of samples (SPEC §2.3–2.7, §3.1)
# ----------------------------------------------------------------------------------------------
def interleave_slots(n_raw, ratio):
    """Window layout for `n_raw` raw tokens at `ratio` (SPEC §2.4, remainder 0): one beacon after
    every `ratio` raw tokens. Returns (raw slot indices, beacon slot indices, T)."""
    if ratio <= 0:
        return torch.arange(n_raw), torch.zeros(0, dtype=torch.long), n_raw
    k = n_raw // ratio
    T = n_raw + k
    slots = torch.arange(T)
    is_b = (slots % (ratio + 1)) == ratio
    return slots[~is_b], slots[is_b], T


def sequence_nll(model, tokens, ratios, window, sink, beacons_in_last, score_from=0, weights=None, raw_tail=0,
                 checkpoint_windows=False):
    """Per-sample weighted next-token NLL sums (f32, [B]) over raw tokens at positions ≥ score_from
    that have a label, and the per-sample weight sums. `tokens` [B, L] (device LongTensor); `ratios`
    one per window; `weights` [B, L] (position p's weight for predicting token p+1; None = all 1).
    `raw_tail` > 0 keeps the last `raw_tail` raw entries of the most recently closed window after
    the beacons until the next close (the engine's `beacon_raw_tail`); gradients flow through them.
    `checkpoint_windows` keeps only each window's inputs (its memory) for the backward and recomputes
    the window there: one window's activations alive instead of the whole sample's (a 12K-token
    sample at ×2 needs more than 24 GiB without it), for one more forward per window."""
    B, Ltot = tokens.shape
    n_win = math.ceil(Ltot / window)
    assert len(ratios) == n_win
    mem, mem_len = None, 0
    kept = None  # sink + every beacon so far (rotated), without the raw tail
    sink_kv = None
    total = torch.zeros(B, device=tokens.device, dtype=torch.float32)
    count = torch.zeros(B, device=tokens.device, dtype=torch.float32)
    dev = tokens.device

    # Defined outside the loop and reading only its arguments: a checkpoint reruns it in the
    # backward, after the loop has moved on to later windows.
    def window_ce(ids, bslots, mem, mem_len, rows, tgt):
        x, kvs = model.window(ids, bslots, mem, mem_len)
        if rows is None:
            return None, kvs
        lg = model.logits(x.index_select(1, rows)).float()
        ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none")
        return ce.view(tgt.shape[0], -1), kvs

    for w in range(n_win):
        s, e = w * window, min((w + 1) * window, Ltot)
        last = w == n_win - 1
        ratio = ratios[w] if (not last or beacons_in_last) else 0
        raw_slots, bslots, T = interleave_slots(e - s, ratio)
        raw_slots, bslots = raw_slots.to(dev), bslots.to(dev)
        ids = torch.zeros((B, T), dtype=torch.long, device=dev)
        ids[:, raw_slots] = tokens[:, s:e]
        # Labels: raw token t predicts t+1; the sample's last token has none.
        lo = max(s, score_from)
        hi = min(e, Ltot - 1)
        rows = tgt = wt = None
        if hi > lo:
            wt = weights[:, lo:hi] if weights is not None else None
            if wt is None or bool((wt > 0).any()):
                rows, tgt = raw_slots[lo - s:hi - s], tokens[:, lo + 1:hi + 1]
        if checkpoint_windows and torch.is_grad_enabled():
            ce, kvs = torch.utils.checkpoint.checkpoint(window_ce, ids, bslots, mem, mem_len, rows, tgt,
                                                        use_reentrant=False)
        else:
            ce, kvs = window_ce(ids, bslots, mem, mem_len, rows, tgt)
        if ce is not None:
            if wt is None:
                total = total + ce.sum(1)
                count = count + ce.shape[1]
            else:
                total = total + (ce * wt).sum(1)
                count = count + wt.sum(1)
        if last:
            break
        # Close the window: memory = sink (first entry of the first window) + every beacon so far
        # (+ this window's last `raw_tail` raw entries after them, replacing the previous tail).
        first_close = kept is None
        if first_close and sink > 0:
            sink_kv = [(model.rope(k[:, :, :sink], 0, sink), v[:, :, :sink]) for k, v in kvs]
        start = kept[0][0].shape[2] if kept is not None else (sink if sink_kv is not None else 0)
        nb = bslots.numel()
        new = [(model.rope(k.index_select(2, bslots), start, nb), v.index_select(2, bslots)) for k, v in kvs]
        if kept is None:
            kept = [(torch.cat((sk, nk), 2), torch.cat((sv, nv), 2)) for (sk, sv), (nk, nv) in zip(sink_kv, new)] \
                if sink_kv is not None else new
        else:
            kept = [(torch.cat((mk, nk), 2), torch.cat((mv, nv), 2)) for (mk, mv), (nk, nv) in zip(kept, new)]
        mem = kept
        if raw_tail > 0:
            # Raw slots hold window tokens 0.. in order; the first window's sink entries never join the tail.
            own = raw_slots[sink:] if first_close and sink_kv is not None else raw_slots
            tail = own[max(0, own.numel() - raw_tail):]
            if tail.numel():
                t0 = kept[0][0].shape[2]
                mem = [(torch.cat((mk, model.rope(k.index_select(2, tail), t0, tail.numel())), 2),
                        torch.cat((mv, v.index_select(2, tail)), 2)) for (mk, mv), (k, v) in zip(kept, kvs)]
        mem_len = mem[0][0].shape[2]
    return total, count


# ----------------------------------------------------------------------------------------------
# Recall samples (the layout of crates/beacon-train/src/recall.rs, from a pre-tokenized fact bank)
# ----------------------------------------------------------------------------------------------
class RecallBank:
    """Facts tokenized by `examples/recall_bank.rs` (the Rust trainer's templates, disjoint from the
    evaluation's). `build` turns a text sample into a recall sample of the same length: facts planted
    at uniformly drawn places at least one window before a query block at the end; the query block
    asks for every fact (shuffled) and, half the time, for a span of the body to be repeated; only
    answer and repeated tokens carry weight."""

    def __init__(self, prefix, facts_min, facts_max):
        idx = json.load(open(prefix + ".json"))
        ids = np.fromfile(prefix + ".u16", dtype=np.uint16).astype(np.int64)
        off = 0

        def take(n):
            nonlocal off
            off += n
            return ids[off - n:off]

        self.facts = [tuple(take(n) for n in lens) for lens in idx["facts"]]
        self.copy_forms = [take(n) for n in idx["copy_forms"]]
        self.copy_mid = take(idx["copy_mid"])
        if off != len(ids):
            sys.exit(f"error: {prefix}.u16 holds {len(ids)} ids, {prefix}.json describes {off}")
        self.facts_min, self.facts_max = facts_min, facts_max

    def build(self, text, rng, window):
        L, w = len(text), window
        n_facts = int(rng.integers(self.facts_min, self.facts_max + 1))
        facts = [self.facts[int(rng.integers(len(self.facts)))] for _ in range(n_facts)]
        query, answer = [], []
        for i in rng.permutation(n_facts):
            _, head, ans = facts[i]
            query += [head, ans]
            answer += [np.zeros(len(head), bool), np.ones(len(ans), bool)]
        planted = [f[0] for f in facts]
        copy = rng.random() < 0.5
        copy_len = 16 + int(rng.integers(33))
        form = self.copy_forms[int(rng.integers(len(self.copy_forms)))]
        copy_total = len(form) + 8 + len(self.copy_mid) + copy_len if copy else 0
        q_len = sum(len(q) for q in query)
        filler_len = L - sum(len(p) for p in planted) - q_len - copy_total
        if filler_len <= w + 64:
            return text.astype(np.int64), None
        filler = text[:filler_len].astype(np.int64)
        at = np.sort(rng.integers(0, filler_len - w, size=n_facts))
        body, prev = [], 0
        for pos, p in zip(at, planted):
            body += [filler[prev:pos], p]
            prev = pos
        body.append(filler[prev:])
        body = np.concatenate(body)
        if copy:
            start = int(rng.integers(0, len(body) - w - (8 + copy_len)))
            span = body[start:start + 8 + copy_len]
            query += [form, span[:8], self.copy_mid, span[8:]]
            answer += [np.zeros(len(form) + 8 + len(self.copy_mid), bool), np.ones(copy_len, bool)]
        tokens = np.concatenate([body] + query)
        is_answer = np.concatenate([np.zeros(len(body), bool)] + answer)
        assert len(tokens) == L, (len(tokens), L)
        weights = np.zeros(L, np.float32)
        weights[:-1] = is_answer[1:]  # position p predicts token p+1
        return tokens, weights


# ----------------------------------------------------------------------------------------------
# Export (atomic: temp file + rename), matching models/*/beacon.safetensors (bf16, SPEC §1.1 names)
# ----------------------------------------------------------------------------------------------
def export_parts(model, out_dir, meta, parts):
    """The same tensors split over `parts` files (a device machine returns files of ≤ 16 MiB)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    st = {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in model.beacon_state().items()}
    layer = lambda n: int(n.split(".")[2]) if n.startswith("model.layers.") else 0
    for p in range(parts):
        chunk = {n: t for n, t in st.items() if layer(n) % parts == p}
        path = os.path.join(out_dir, f"beacon.part{p}.safetensors")
        save_file(chunk, path + ".tmp", metadata={k: str(v) for k, v in meta.items()})
        os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------
def write_tiny_gguf(path, seed=0):
    """A 2-layer random llama GGUF with the default model's vocabulary size (so real training tokens
    fit): a device call's smoke test of this script before the real model has arrived."""
    import gguf

    rng = np.random.default_rng(seed)
    V, D, Fd, L, H, KV = 49152, 32, 64, 2, 2, 1
    w = gguf.GGUFWriter(path, "llama")
    for key, val in (("block_count", L), ("context_length", 8192), ("embedding_length", D),
                     ("feed_forward_length", Fd), ("attention.head_count", H), ("attention.head_count_kv", KV)):
        w.add_uint32(f"llama.{key}", val)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    rand = lambda *shape: (rng.standard_normal(shape) * 0.05).astype(np.float16)
    w.add_tensor("token_embd.weight", rand(V, D))
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))
    for i in range(L):
        p, hd = f"blk.{i}.", D // H
        for n in ("attn_norm", "ffn_norm"):
            w.add_tensor(p + n + ".weight", np.ones(D, np.float32))
        for n, shape in (("attn_q", (D, D)), ("attn_k", (KV * hd, D)), ("attn_v", (KV * hd, D)),
                         ("attn_output", (D, D)), ("ffn_gate", (Fd, D)), ("ffn_up", (Fd, D)), ("ffn_down", (D, Fd))):
            w.add_tensor(p + n + ".weight", rand(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


HELD_OUT = ("pg28054", "pg6593", "pg3300", "pg4300", "pg4276", "pg6688", "pg2600", "pg1023")  # the Rust trainer's default --heldout (docs/TRAINING.md "Data")


def read_token_cache(cache_dir):
    """A Rust trainer's token cache (`runs/X/token-cache/`: `<key>.json` lists documents and lengths,
    `<key>.bin` holds their u32 ids): (name, ids) for every document, in file order."""
    import glob

    docs = []
    for j in sorted(glob.glob(os.path.join(cache_dir, "*.json"))):
        lens = json.load(open(j))["docs"]
        ids = np.fromfile(j[:-5] + ".bin", dtype=np.uint32)
        if sum(n for _, n in lens) != len(ids):
            sys.exit(f"error: {j}: the documents' lengths do not add up to {j[:-5]}.bin's {len(ids)} ids")
        off = 0
        for name, n in lens:
            docs.append((name, ids[off:off + n]))
            off += n
    return docs


def pack_tokens(args):
    """Training tokens for a device run from a Rust trainer's token cache: every document not held
    out (docs/TRAINING.md "Data"), each followed by EOS, as u16 (the default model's vocabulary fits)."""
    parts, names = [], set()
    for name, doc in read_token_cache(args.pack_tokens):
        if name.split("/")[-1].split(".")[0] in HELD_OUT or name in names:
            continue
        names.add(name)
        parts += [doc, np.array([args.eos], dtype=np.uint32)]
    a = np.concatenate(parts)
    if a.max() >= 2**16:
        sys.exit(f"error: token id {a.max()} does not fit u16")
    a.astype(np.uint16).tofile(args.out + ".tmp")
    os.replace(args.out + ".tmp", args.out)
    print(f"{args.out}: {len(names)} documents, {len(a):,} tokens")


SCORE_DOCS = ("pg6593", "pg3300", "pg4300", "pg4276", "pg6688")  # crates/beacon-train/src/score.rs


def pack_score(args):
    """The spans of the Rust trainer's checkpoint score (score.rs: 2 spans of 4,096 tokens per
    document, spread evenly inside it), as u16 rows, so a device run ranks its weights by the same
    quantity `beacon train --score-every` reports."""
    docs = dict(read_token_cache(args.pack_score))
    rows = []
    for name in SCORE_DOCS:
        if name not in docs:
            sys.exit(f"error: {args.pack_score}: no tokens of {name}")
        ids, per_doc = docs[name], 2
        room = len(ids) - args.len
        rows += [ids[(j + 1) * room // (per_doc + 1):][:args.len] for j in range(per_doc)]
    np.stack(rows).astype(np.uint16).tofile(args.out)
    print(f"{args.out}: {len(rows)} spans of {args.len} tokens")


def score(model, spans, ratio, window, sink, scored, raw_tail=0):
    """PPL of the last `scored` tokens of each span read at one ratio (inference layout: the open
    window holds beacons too), pooled over spans — the Rust trainer's checkpoint score."""
    with torch.no_grad():
        L = spans.shape[1]
        nll, n = sequence_nll(model, spans, [ratio] * math.ceil(L / window), window, sink,
                              beacons_in_last=True, score_from=L - scored - 1, raw_tail=raw_tail)
    return math.exp(nll.sum().item() / n.sum().item())


def merge(args):
    """Join the `beacon.part*.safetensors` a device run wrote into one `beacon.safetensors`."""
    import glob
    from safetensors import safe_open
    from safetensors.torch import save_file

    parts = sorted(glob.glob(os.path.join(args.merge, "beacon.part*.safetensors")))
    if not parts:
        sys.exit(f"error: {args.merge}: no beacon.part*.safetensors")
    st, meta = {}, {}
    for p in parts:
        with safe_open(p, "pt") as f:
            meta = f.metadata() or meta
            for k in f.keys():
                st[k] = f.get_tensor(k)
    expected = 1 + 4 * (1 + max(int(k.split(".")[2]) for k in st if k.startswith("model.layers.")))
    if len(st) != expected:
        sys.exit(f"error: {args.merge}: {len(st)} tensors in {len(parts)} parts, expected {expected}")
    save_file(st, args.out + ".tmp", metadata=meta)
    os.replace(args.out + ".tmp", args.out)
    print(f"{args.out}: {len(st)} tensors from {len(parts)} parts, {meta}")
    if args.config:
        # Record how the weights were made in the `training` section of the beacon_config.json
        # that ships beside them (the engine's loader reads only the beacon_* keys).
        with open(args.config) as f:
            cfg = json.load(f)
        cfg["training"] = {"trainer": "scripts/train_gpu.py", **{k: meta[k] for k in sorted(meta)}}
        with open(args.config + ".tmp", "w") as f:
            json.dump(cfg, f, indent=2)
        os.replace(args.config + ".tmp", args.config)
        print(f"{args.config}: training section written")


def cpu_model(args):
    """The backbone in f32 on the CPU with `--beacon`'s weights (else backbone copies): the
    engine's numerics, for the checks against it."""
    cfg, t = load_gguf(args.gguf)
    model = BeaconModel(cfg, t, torch.float32, "cpu")
    if args.beacon:
        model.load_beacons(args.beacon)
    return model


def parity(args):
    model = cpu_model(args)
    toks = np.fromfile(args.parity, dtype=np.uint32)[: args.len].astype(np.int64)
    tokens = torch.from_numpy(toks).reshape(1, -1)
    n_win = math.ceil(args.len / args.window)
    with torch.no_grad():
        nll, n = sequence_nll(model, tokens, [args.ratio] * n_win, args.window, args.sink,
                              beacons_in_last=True, score_from=args.len - args.scored - 1,
                              raw_tail=args.raw_tail)
    nll, n = nll.sum().item(), n.sum().item()
    print(json.dumps({"ppl": math.exp(nll / n), "nll": nll, "tokens": n}))


def train(args):
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t_start = time.time()
    dev = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" or args.bf16 else torch.float32
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg, t = load_gguf(args.gguf)
    model = BeaconModel(cfg, t, dtype, dev)
    del t
    if args.init_beacons:
        model.load_beacons(args.init_beacons)
    data = np.fromfile(args.tokens, dtype=np.uint16)
    print(f"device {dev}, {len(data):,} training tokens, load {time.time() - t_start:.1f}s", flush=True)
    bank = RecallBank(args.recall_bank, args.facts_min, args.facts_max) if args.recall_mix > 0 else None
    if dev == "cuda" and args.memory_fraction < 1:
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "train_log.jsonl"), "a")
    ratios_all = [int(r) for r in args.ratios.split(",")]
    lens = [int(x) for x in args.seq_lens.split(",")]
    batch = {L: max(1, args.tokens_per_step // L) for L in lens}
    train_t0 = time.time()
    budget = args.deadline_s - (train_t0 - t_start)
    step, seen, last_save = 0, 0, time.time()
    spans = None
    if args.score_tokens:
        spans = torch.from_numpy(np.fromfile(args.score_tokens, dtype=np.uint16).astype(np.int64)).view(-1, args.len).to(dev)
    best = float("inf")

    def score_and_keep(final=False):
        nonlocal best, last_save
        ts = time.time()
        ppl = score(model, spans, args.ratio, args.window, args.sink, args.scored, args.raw_tail)
        kept = ppl < best
        if kept:
            best = ppl
            export_parts(model, args.out, {**meta, "step": step, "tokens": seen, "score_ppl": ppl}, args.parts)
        # The latest weights too, under last/: the score reads 4K tokens, and a run aimed at longer
        # contexts is judged on held-out books at 16K+ whatever the score says.
        export_parts(model, os.path.join(args.out, "last"), {**meta, "step": step, "tokens": seen, "score_ppl": ppl},
                     args.parts)
        rec = {"step": step, "tokens": seen, "score_ppl": ppl, "kept": kept, "score_s": round(time.time() - ts, 1),
               "elapsed_s": round(time.time() - t_start, 1)}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        print(json.dumps(rec), flush=True)
        last_save = time.time()

    meta = {"recall_mix": args.recall_mix, "recall_weight": args.recall_weight, "ratios": args.ratios, "fixed_ratio_frac": args.fixed_ratio_frac, "checkpoint_windows": args.checkpoint_windows, "seq_lens": args.seq_lens, "lr": args.lr, "window": args.window,
            "sink": args.sink, "tokens_per_step": args.tokens_per_step, "seed": args.seed,
            "window_start_weight": args.window_start_weight, "window_start_span": args.window_start_span,
            "raw_tail": args.raw_tail, "init_beacons": args.init_beacons or "backbone copies"}
    if spans is not None:
        score_and_keep()
    while True:
        frac = (time.time() - train_t0) / budget
        if frac >= 1.0 or (args.max_steps and step >= args.max_steps):
            break
        warm = args.warmup_frac
        lr_scale = frac / warm if frac < warm else args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * (frac - warm) / (1 - warm)))
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_scale
        L = lens[int(rng.integers(len(lens)))]
        n_win = math.ceil(L / args.window)
        # Inference reads a whole document at one ratio; a per-window draw almost never builds such a
        # stack (all-×2 over 15 windows: p = 5^-15), so --fixed-ratio-frac of the samples use one ratio.
        if args.fixed_ratio_frac > 0 and rng.random() < args.fixed_ratio_frac:
            ratios = [ratios_all[int(rng.integers(len(ratios_all)))]] * n_win
        else:
            ratios = [ratios_all[int(rng.integers(len(ratios_all)))] for _ in range(n_win)]
        # Plain text's per-position weights: the first --window-start-span positions of every window
        # after the first (where the open window holds few raw tokens and the model leans on the
        # beacons) count --window-start-weight times.
        plain_weights = np.ones(L, np.float32)
        if args.window_start_weight != 1.0:
            offs = np.arange(L) % args.window
            plain_weights[(offs < args.window_start_span) & (np.arange(L) >= args.window)] = args.window_start_weight
        while True:
            B = batch[L]
            starts = rng.integers(0, len(data) - L, size=B)
            n_recall = int(round(B * args.recall_mix)) if bank else 0
            rows, wrows = [], []
            for j, st in enumerate(starts):
                text = data[st:st + L]
                tw = bank.build(text, rng, args.window) if j < n_recall else (text.astype(np.int64), None)
                rows.append(tw[0])
                wrows.append(tw[1] if tw[1] is not None else plain_weights)
            is_recall = torch.tensor([j < n_recall for j in range(B)], device=dev)
            tokens = torch.from_numpy(np.stack(rows)).to(dev)
            weights = torch.from_numpy(np.stack(wrows)).to(dev)
            oom = False
            try:
                ts = time.time()
                nll, n = sequence_nll(model, tokens, ratios, args.window, args.sink, beacons_in_last=False,
                                      weights=weights, raw_tail=args.raw_tail,
                                      checkpoint_windows=args.checkpoint_windows)
                plain = nll[~is_recall].sum() / n[~is_recall].sum().clamp(min=1)
                recall = nll[is_recall].sum() / n[is_recall].sum().clamp(min=1)
                loss = plain + args.recall_weight * recall if n_recall else plain
                opt.zero_grad(set_to_none=True)
                loss.backward()
                break
            except torch.OutOfMemoryError:
                oom = True
            # Free the failed step's graph only here, outside the `except`: inside it the traceback
            # still holds every activation, and a retry at half the batch ran out of memory again.
            if oom:
                nll = n = plain = recall = loss = tokens = weights = None
                opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                if batch[L] == 1:
                    sys.exit(f"error: out of memory at batch 1 × {L} tokens; lower --seq-lens")
                batch[L] = max(1, batch[L] // 2)
                print(f"out of memory at batch {B} × {L}: batch {batch[L]}", flush=True)
        gn = torch.nn.utils.clip_grad_norm_(params, args.clip)
        if torch.isfinite(gn):
            opt.step()
        step += 1
        seen += B * L
        dt_step = time.time() - ts
        rec = {"step": step, "loss": plain.item(), "recall_loss": recall.item() if n_recall else None, "grad_norm": gn.item(), "lr": args.lr * lr_scale,
               "batch": B, "len": L, "tokens": seen, "tok_s": B * L / dt_step,
               "elapsed_s": round(time.time() - t_start, 1)}
        if dev == "cuda":
            rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if step <= 3 or step % args.print_every == 0:
            print(json.dumps(rec), flush=True)
        if spans is not None:
            if time.time() - last_save > args.score_every_s:
                score_and_keep()
        elif time.time() - last_save > args.save_every_s:
            export_parts(model, args.out, {**meta, "step": step, "tokens": seen}, args.parts)
            last_save = time.time()
    if spans is not None:
        score_and_keep()
    else:
        export_parts(model, args.out, {**meta, "step": step, "tokens": seen}, args.parts)
    print(json.dumps({"done": True, "steps": step, "tokens": seen, "elapsed_s": round(time.time() - t_start, 1)}),
          flush=True)


def check_checkpoint():
    """--check-checkpoint: on a tiny random backbone, the gradients of a sample read with
    --checkpoint-windows equal those of one graph over the whole sample (mixed ratios, a raw tail,
    per-token weights, a partial last window)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tiny.gguf")
        write_tiny_gguf(path)
        cfg, t = load_gguf(path)
    model = BeaconModel(cfg, t, torch.float32, "cpu")
    torch.manual_seed(0)
    with torch.no_grad():  # move off the backbone copies, where some gradients vanish by symmetry
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    L, window = 250, 32
    tokens = torch.randint(0, model.embed.shape[0], (2, L))
    weights = torch.rand(2, L)
    ratios = [2, 8, 4, 2, 16, 8, 2, 4]
    grads = {}
    for ck in (False, True):
        model.zero_grad(set_to_none=True)
        nll, n = sequence_nll(model, tokens, ratios, window, 1, False, weights=weights, raw_tail=window // 4,
                              checkpoint_windows=ck)
        (nll.sum() / n.sum()).backward()
        grads[ck] = {name: p.grad.clone() for name, p in model.named_parameters()}
    worst = 0.0
    for name, g in grads[True].items():
        ref = grads[False][name]
        # The last layer's beacon q and o feed only the beacons' final states, which nothing reads.
        if ref.norm() == 0 and not name.endswith(f".{cfg['layers'] - 1}"):
            sys.exit(f"error: --check-checkpoint: {name} has no gradient")
        worst = max(worst, ((g - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item())
    print(json.dumps({"check": "checkpoint-windows", "params": len(grads[True]), "worst_rel_diff": worst}))
    if worst > 1e-5:
        sys.exit(f"error: --check-checkpoint: gradients differ by {worst:.2e} (relative), bound 1e-5")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="the backbone (llama GGUF)")
    ap.add_argument("--write-tiny-gguf", help="write a tiny random llama GGUF here (smoke tests)")
    ap.add_argument("--pack-tokens", help="a Rust run's token-cache directory: write training tokens to --out")
    ap.add_argument("--eos", type=int, default=2, help="EOS id put after each document (--pack-tokens)")
    ap.add_argument("--pack-score", help="a Rust run's token-cache directory: write the score spans to --out")
    ap.add_argument("--score-only", help="score spans file: print the score of --beacon (CPU, f32)")
    ap.add_argument("--score-tokens", help="score spans file: score during training, keep the best weights")
    ap.add_argument("--score-every-s", type=float, default=60)
    ap.add_argument("--merge", help="directory of beacon.part*.safetensors: join them into --out (a file)")
    ap.add_argument("--config", help="with --merge: a beacon_config.json to record the run's settings in "
                    "(its `training` section)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--sink", type=int, default=1)
    ap.add_argument("--raw-tail", type=int, default=0,
                    help="keep the last N raw entries of the closed window after the beacons (beacon_raw_tail)")
    ap.add_argument("--parity", help="u32 token file: print PPL of the last --scored tokens of --len")
    ap.add_argument("--beacon", help="beacon.safetensors for --parity")
    ap.add_argument("--ratio", type=int, default=8)
    ap.add_argument("--len", type=int, default=4096)
    ap.add_argument("--scored", type=int, default=1024)
    ap.add_argument("--tokens", help="u16 training tokens (held-out books excluded)")
    ap.add_argument("--init-beacons", help="start from this beacon.safetensors instead of backbone copies")
    ap.add_argument("--out", default="runs/gpu")
    ap.add_argument("--ratios", default="2,4,8,16,32")
    ap.add_argument("--seq-lens", default="8192")
    ap.add_argument("--check-checkpoint", action="store_true",
                    help="check on a tiny random model that --checkpoint-windows leaves the gradients unchanged")
    ap.add_argument("--checkpoint-windows", action="store_true",
                    help="recompute each window in the backward: memory of one window's graph, not the sample's")
    ap.add_argument("--fixed-ratio-frac", type=float, default=0.0,
                    help="share of samples read at one ratio drawn for the whole sample (else one per window)")
    ap.add_argument("--tokens-per-step", type=int, default=65536)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup-frac", type=float, default=0.03)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--deadline-s", type=float, default=480)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--save-every-s", type=float, default=120)
    ap.add_argument("--print-every", type=int, default=10)
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="bf16 activations on the CPU too (as on a GPU)")
    ap.add_argument("--recall-mix", type=float, default=0.0, help="share of each batch made recall samples")
    ap.add_argument("--recall-weight", type=float, default=1.0, help="recall answers' loss beside the text's")
    ap.add_argument("--window-start-weight", type=float, default=1.0,
                    help="loss weight of plain text's first --window-start-span positions in each window after the first")
    ap.add_argument("--window-start-span", type=int, default=128)
    ap.add_argument("--recall-bank", default=".dev/facts", help="prefix of examples/recall_bank.rs's output")
    ap.add_argument("--facts-min", type=int, default=2)
    ap.add_argument("--facts-max", type=int, default=8)
    ap.add_argument("--memory-fraction", type=float, default=1.0, help="cap on this process's GPU memory")
    args = ap.parse_args()
    if args.check_checkpoint:
        check_checkpoint()
    elif args.write_tiny_gguf:
        write_tiny_gguf(args.write_tiny_gguf)
    elif args.pack_score:
        pack_score(args)
    elif args.score_only:
        model = cpu_model(args)
        spans = torch.from_numpy(np.fromfile(args.score_only, dtype=np.uint16).astype(np.int64)).view(-1, args.len)
        print(json.dumps({"score_ppl": score(model, spans, args.ratio, args.window, args.sink, args.scored,
                                             args.raw_tail)}))
    elif args.pack_tokens:
        pack_tokens(args)
    elif args.merge:
        merge(args)
    elif args.parity:
        parity(args)
    elif args.tokens:
        train(args)
    else:
        ap.error("give --parity or --tokens")


if __name__ == "__main__":
    main()
