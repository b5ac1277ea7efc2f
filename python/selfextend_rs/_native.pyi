import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Optional, Union, final

import numpy as np
import numpy.typing as npt

from selfextend_rs._aio import AsyncTextStream

__version__: str
__all__ = [
    "Completion",
    "ContextLengthWarning",
    "Engine",
    "EngineRequest",
    "InferenceError",
    "InvalidArgumentError",
    "Model",
    "ModelConfig",
    "ModelLoadError",
    "OutOfMemoryError",
    "OverloadedError",
    "RopeScaling",
    "SelfExtend",
    "SelfExtendError",
    "TextStream",
    "Tokenizer",
    "TokenizerError",
    "UnsupportedModelError",
    "__version__",
    "cuda_available",
]

def cuda_available() -> bool: ...

class SelfExtendError(Exception): ...
class ModelLoadError(SelfExtendError): ...
class UnsupportedModelError(ModelLoadError): ...
class TokenizerError(SelfExtendError): ...
class OutOfMemoryError(SelfExtendError): ...
class InferenceError(SelfExtendError): ...
class OverloadedError(SelfExtendError): ...
class InvalidArgumentError(SelfExtendError, ValueError): ...
class ContextLengthWarning(UserWarning): ...

_Prompt = Union[str, Sequence[int]]
_FinishReason = Literal["eos", "stop", "length"]
_SelfExtendArg = Union["SelfExtend", Literal["auto"], None]
_Progress = Union[bool, Callable[[int, int], object], None]
# Each message must be a dict: the native layer takes no other mapping.
_Messages = Sequence[dict[str, str]]

@final
class SelfExtend:
    """SelfExtend's two knobs: group size G and neighbor window W."""

    def __new__(cls, group_size: int, window: int) -> SelfExtend: ...
    @property
    def group_size(self) -> int: ...
    @property
    def window(self) -> int: ...
    def max_context(self, trained_context: int) -> int: ...
    @staticmethod
    def auto(target_length: int, trained_context: int) -> SelfExtend: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __getnewargs__(self) -> tuple[int, int]: ...

@final
class RopeScaling:
    """A RoPE scaling baseline: linear, NTK-aware or dynamic NTK."""

    @staticmethod
    def linear(factor: float) -> RopeScaling: ...
    @staticmethod
    def ntk(factor: float) -> RopeScaling: ...
    @staticmethod
    def dynamic_ntk(factor: float, original_context: Optional[int] = None) -> RopeScaling: ...
    @property
    def kind(self) -> Literal["linear", "ntk", "dynamic_ntk", "llama3", "rope_freqs", "longrope"]: ...
    @property
    def factor(self) -> float: ...
    @property
    def original_context(self) -> Optional[int]: ...
    def __eq__(self, value: object, /) -> bool: ...

@final
class ModelConfig:
    @property
    def model_type(self) -> str: ...
    @property
    def trained_context(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def intermediate_size(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def rope_theta(self) -> float: ...
    @property
    def rope_scaling(self) -> Optional[RopeScaling]: ...
    @property
    def layer_types(self) -> list[Literal["full_attention", "sliding_attention"]]: ...
    @property
    def sliding_window(self) -> Optional[int]: ...
    @property
    def self_extend_layers(self) -> list[int]: ...
    @property
    def rms_norm_eps(self) -> float: ...
    @property
    def tie_word_embeddings(self) -> bool: ...
    @property
    def bos_token_id(self) -> Optional[int]: ...
    @property
    def eos_token_ids(self) -> list[int]: ...

@final
class Completion:
    @property
    def text(self) -> str: ...
    @property
    def token_ids(self) -> list[int]: ...
    @property
    def finish_reason(self) -> _FinishReason: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def prefill_seconds(self) -> float: ...
    @property
    def decode_tokens_per_second(self) -> float: ...

@final
class Tokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...
    @property
    def vocab_size(self) -> int: ...

@final
class TextStream(Iterator[str]):
    def __iter__(self) -> TextStream: ...
    def __next__(self) -> str: ...
    def close(self) -> None: ...
    @property
    def completion(self) -> Optional[Completion]: ...

@final
class Model:
    @staticmethod
    def load(
        path: Union[str, os.PathLike[str], None] = None,
        *,
        device: str = "cpu",
        dtype: Optional[Literal["f32", "bf16", "f16"]] = None,
        max_memory: Optional[int] = None,
        attention: Literal["auto", "naive", "tiled", "fused"] = "auto",
        kv_cache: Optional[Literal["f32", "f16", "bf16"]] = None,
    ) -> Model: ...
    @property
    def attention(self) -> Literal["naive", "tiled", "fused"]: ...
    @property
    def kv_cache(self) -> str: ...
    @property
    def max_memory(self) -> Optional[int]: ...
    @property
    def config(self) -> ModelConfig: ...
    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def path(self) -> pathlib.Path: ...
    @property
    def dtype(self) -> str: ...
    @property
    def quantized(self) -> bool: ...
    @property
    def chat_template(self) -> Optional[str]: ...
    def logits(
        self,
        token_ids: Sequence[int],
        *,
        self_extend: _SelfExtendArg = None,
        rope_scaling: Optional[RopeScaling] = None,
        chunk_size: Optional[int] = None,
        progress: _Progress = None,
    ) -> npt.NDArray[np.float32]: ...
    def token_logprobs(
        self,
        token_ids: Sequence[int],
        *,
        start: int = 1,
        self_extend: _SelfExtendArg = None,
        rope_scaling: Optional[RopeScaling] = None,
        chunk_size: Optional[int] = None,
        progress: _Progress = None,
    ) -> npt.NDArray[np.float32]: ...
    def generate(
        self,
        prompt: _Prompt,
        max_new_tokens: int = 128,
        *,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        self_extend: _SelfExtendArg = None,
        rope_scaling: Optional[RopeScaling] = None,
        chunk_size: Optional[int] = None,
        progress: _Progress = None,
    ) -> Completion: ...
    def stream(
        self,
        prompt: _Prompt,
        max_new_tokens: int = 128,
        *,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        self_extend: _SelfExtendArg = None,
        rope_scaling: Optional[RopeScaling] = None,
        chunk_size: Optional[int] = None,
        progress: _Progress = None,
    ) -> TextStream: ...
    def chat(
        self,
        messages: _Messages,
        max_new_tokens: int = 128,
        *,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        self_extend: _SelfExtendArg = None,
        rope_scaling: Optional[RopeScaling] = None,
        chunk_size: Optional[int] = None,
        progress: _Progress = None,
    ) -> Completion: ...
    def chat_stream(
        self,
        messages: _Messages,
        max_new_tokens: int = 128,
        *,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        self_extend: _SelfExtendArg = None,
        rope_scaling: Optional[RopeScaling] = None,
        chunk_size: Optional[int] = None,
        progress: _Progress = None,
    ) -> TextStream: ...
    async def agenerate(
        self,
        prompt: _Prompt,
        max_new_tokens: int = 128,
        *,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        self_extend: _SelfExtendArg = None,
        rope_scaling: Optional[RopeScaling] = None,
        chunk_size: Optional[int] = None,
    ) -> Completion: ...
    def astream(
        self,
        prompt: _Prompt,
        max_new_tokens: int = 128,
        *,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        self_extend: _SelfExtendArg = None,
        rope_scaling: Optional[RopeScaling] = None,
        chunk_size: Optional[int] = None,
    ) -> AsyncTextStream: ...
    async def achat(
        self,
        messages: _Messages,
        max_new_tokens: int = 128,
        *,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        self_extend: _SelfExtendArg = None,
        rope_scaling: Optional[RopeScaling] = None,
        chunk_size: Optional[int] = None,
    ) -> Completion: ...
    def achat_stream(
        self,
        messages: _Messages,
        max_new_tokens: int = 128,
        *,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        self_extend: _SelfExtendArg = None,
        rope_scaling: Optional[RopeScaling] = None,
        chunk_size: Optional[int] = None,
    ) -> AsyncTextStream: ...

@final
class EngineRequest:
    def cancel(self) -> None: ...

@final
class Engine:
    def __new__(
        cls,
        model: Model,
        *,
        max_batch: int = 8,
        prefill_tokens_per_step: int = 256,
        kv_budget: Optional[int] = None,
        max_queue: int = 64,
    ) -> Engine: ...
    def submit(
        self,
        request_id: int,
        prompt: _Prompt,
        max_new_tokens: int = 128,
        *,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        self_extend: _SelfExtendArg = None,
        rope_scaling: Optional[RopeScaling] = None,
        chunk_size: Optional[int] = None,
    ) -> EngineRequest: ...
    def chat_prompt(self, messages: _Messages) -> list[int]: ...
    def next_events(self, timeout: float) -> list[tuple[int, Literal["text", "done", "error"], Any]]: ...
    @property
    def stats(self) -> dict[str, int]: ...
    @property
    def options(self) -> dict[str, int]: ...
