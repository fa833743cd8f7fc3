"""Type stubs of the native module `beacon._beacon` (Rust, pyo3). Use the `beacon` package's
`Model` / `Session` / `train` / `eval.ppl`; these are their building blocks."""

from os import PathLike
from typing import Iterator, List, Optional, Tuple, Union

__version__: str

_Path = Union[str, PathLike[str]]
_Buffer = Tuple[bytearray, List[int]]  # little-endian f32 data and its shape

def load_model(
    path: Optional[_Path] = None,
    beacon: Optional[_Path] = None,
    beacon_config: Optional[_Path] = None,
    dtype: str = "auto",
    untrained: bool = False,
    prefill_weights: str = "auto",
    memory_limit: Optional[str] = None,
) -> Tuple[NativeModel, Optional[str]]:
    """Load a model as `beacon run -m PATH` does; returns it and a warning to show, if any."""

def train(args: List[str]) -> None:
    """`beacon train ARGS...` in-process (Ctrl-C: checkpoint, export, KeyboardInterrupt)."""

def eval_ppl(args: List[str]) -> str:
    """`beacon eval ppl ARGS...` in-process; returns its records as JSON."""

class NativeModel:
    def info(self) -> str: ...
    def tokenize(self, text: str, special: bool = False) -> List[int]: ...
    def detokenize(self, ids: List[int]) -> str: ...
    def apply_chat_template(self, messages: List[Tuple[str, str]], add_generation_prompt: bool = True) -> str: ...
    def session(
        self,
        mode: Optional[str] = None,
        ratio: Optional[str] = None,
        window: Optional[int] = None,
        sink: Optional[int] = None,
        keep: Optional[int] = None,
        ratio_seed: Optional[int] = None,
        kv_dtype: str = "f16",
    ) -> NativeSession: ...
    def load_session(self, path: _Path) -> NativeSession: ...

class NativeSession:
    def feed(self, tokens: List[int], logits_from: Optional[int] = None) -> Optional[_Buffer]: ...
    def logits(self) -> _Buffer: ...
    def generate(
        self,
        prompt: List[int],
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        stop: List[str] = ...,
        seed: int = 0,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        dry: bool = False,
        dry_multiplier: Optional[float] = None,
        dry_base: Optional[float] = None,
        dry_allowed_length: Optional[int] = None,
        dry_range: Optional[int] = None,
        dry_prompt_tail: Optional[int] = None,
        stream: bool = False,
    ) -> Union[str, TokenStream]: ...
    def stats(self) -> str: ...
    def tokens(self) -> List[int]: ...
    def save(self, path: _Path) -> str: ...
    def reset(self) -> None: ...

class TokenStream(Iterator[str]):
    """Text pieces of a streamed generation; `close()` stops it (the session keeps what was generated)."""

    def __iter__(self) -> TokenStream: ...
    def __next__(self) -> str: ...
    def close(self) -> None: ...
