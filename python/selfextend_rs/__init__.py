"""Run open LLMs (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3) far beyond their trained
context with exact SelfExtend attention (Jin et al., "LLM Maybe LongLM", ICML 2024), on a Rust/candle engine.

>>> import selfextend_rs as se
>>> model = se.Model.load("path/to/llama")                        # doctest: +SKIP
>>> out = model.generate(long_prompt, self_extend=se.SelfExtend(4, 1024))  # doctest: +SKIP
"""

from selfextend_rs import _cpu

_cpu.check()

from selfextend_rs._native import (  # noqa: E402
    Completion,
    ContextLengthWarning,
    Engine,
    EngineRequest,
    InferenceError,
    InvalidArgumentError,
    Model,
    ModelConfig,
    ModelLoadError,
    OutOfMemoryError,
    OverloadedError,
    RopeScaling,
    SelfExtend,
    SelfExtendError,
    TextStream,
    Tokenizer,
    TokenizerError,
    UnsupportedModelError,
    __version__,
    cuda_available,
)
from selfextend_rs._aio import AsyncEngine, AsyncTextStream  # noqa: E402
from selfextend_rs._models import default_model  # noqa: E402

__all__ = [
    "AsyncEngine",
    "AsyncTextStream",
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
    "default_model",
]
