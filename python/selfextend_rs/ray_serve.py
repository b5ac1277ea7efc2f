"""Scale out on Ray Serve: the app of `selfextend-rs serve` as Ray Serve replicas.

Each replica loads the model and runs the same OpenAI-compatible ASGI app (its own
continuous-batching engine); Ray's HTTP proxy spreads requests over the replicas, on
one machine or a cluster. Going from one to many is configuration:

    pip install "selfextend-rs[ray]"
    serve run selfextend_rs.ray_serve:build_app model=/models/model.gguf num_replicas=2 threads=4

or, for `serve deploy`, a config file:

    applications:
      - name: selfextend
        route_prefix: /
        import_path: selfextend_rs.ray_serve:build_app
        args: {model: /models/model.gguf, num_replicas: 4, threads: 8, self_extend: auto}

From Python, `serve.run(selfextend_rs.ray_serve.app(model=..., num_replicas=2))`.
Needs the `ray` extra, tested with Ray 2.60.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Optional, Union, cast

import selfextend_rs as se

try:
    from ray import serve
    from ray.serve import Application
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError('Ray Serve deployment needs the "ray" extra: pip install "selfextend-rs[ray]"') from None

__all__ = ["app", "build_app"]

_SelfExtend = Union[se.SelfExtend, str, None]
_DTYPES = ("f32", "bf16", "f16")


def app(model: Union[str, Path, None] = None, *, num_replicas: int = 1, threads: Optional[int] = None,
        model_name: Optional[str] = None, self_extend: _SelfExtend = "auto", device: str = "cpu",
        dtype: Optional[Literal["f32", "bf16", "f16"]] = None,
        kv_cache: Optional[Literal["f32", "bf16", "f16"]] = None, max_batch: int = 8,
        max_queue: int = 64, kv_budget: Optional[int] = None, prefill_tokens_per_step: int = 256,
        name: str = "selfextend") -> Application:
    """A Ray Serve application: `num_replicas` copies of the OpenAI-compatible server.

    Args:
        model: A GGUF file or a checkpoint directory, readable at the same path on every
            node (default: the bundled SmolLM2-135M-Instruct).
        num_replicas: Replicas, each with its own copy of the weights and its own engine.
        threads: CPU threads per replica, also reserved as its Ray CPUs. By default a
            replica uses every core of its node and Ray reserves its default for it:
            set `threads` when replicas share a node.
        model_name: The id clients pass as `model` (default: the file or directory name).
        self_extend: The setting for requests without a `self_extend` field: "auto", a
            SelfExtend, or None for plain attention.
        device, dtype, kv_cache: As for `Model.load`.
        max_batch, max_queue, kv_budget, prefill_tokens_per_step: Each replica's engine
            options, as for `selfextend-rs serve`.
        name: The deployment's name.

    The model file is checked here, before Ray starts any replica, so a wrong path fails
    at `serve run` with `ModelLoadError` rather than in a replica's log.
    """
    path = Path(model) if model is not None else se.default_model()
    if not path.exists():
        raise se.ModelLoadError(f"no model at {path}: give a GGUF file or a checkpoint directory")
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    engine_options: dict[str, Any] = {"max_batch": max_batch, "max_queue": max_queue, "kv_budget": kv_budget,
                                      "prefill_tokens_per_step": prefill_tokens_per_step}
    name_for_clients = model_name or path.name

    def asgi_app() -> Any:
        # Runs on each replica, after Ray has set its environment (threads below).
        from selfextend_rs.server import create_app

        loaded = se.Model.load(path, device=device, dtype=dtype, kv_cache=kv_cache)
        return create_app(loaded, model_name=name_for_clients, default_self_extend=self_extend, **engine_options)

    actor_options: dict[str, Any] = {}
    if threads is not None:
        # rayon and candle size their pools from RAYON_NUM_THREADS; Ray reserves the CPUs.
        actor_options = {"num_cpus": threads, "runtime_env": {"env_vars": {"RAYON_NUM_THREADS": str(threads)}}}
    deployment = serve.deployment(
        name=name,
        num_replicas=num_replicas,
        # The engine batches what it is given: let Ray hand a replica as many requests as
        # it can run and queue (beyond that the engine itself answers 429).
        max_ongoing_requests=max_batch + max_queue,
        ray_actor_options=actor_options,
    )(serve.ingress(asgi_app)())
    return deployment.bind()


def build_app(args: Mapping[str, Any]) -> Application:
    """The application builder for `serve run selfextend_rs.ray_serve:build_app key=value ...`
    and for `import_path` in a Serve config file.

    Keys are `app`'s arguments; values may be strings, as `serve run` passes them.
    `self_extend` takes `auto`, `none`, or `G,W` (group size and window).
    """
    unknown = set(args) - _ARGS.keys()
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(sorted(unknown))}; "
                         f"build_app takes {', '.join(sorted(_ARGS))}")
    kwargs: dict[str, Any] = {}
    for key, value in args.items():
        try:
            kwargs[key] = _ARGS[key](value)
        except ValueError as e:
            raise ValueError(f"{key}={value!r}: {e}") from None
    return app(**kwargs)


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer")
    return int(value)


def _optional_int(value: Any) -> Optional[int]:
    return None if value is None or str(value).lower() == "none" else _int(value)


def _dtype(value: Any) -> Optional[Literal["f32", "bf16", "f16"]]:
    if value is None or str(value).lower() == "none":
        return None
    if value not in _DTYPES:
        raise ValueError(f"expected one of {', '.join(_DTYPES)}")
    return cast(Literal["f32", "bf16", "f16"], value)


def _self_extend(value: Any) -> _SelfExtend:
    if value is None or isinstance(value, se.SelfExtend):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in ("none", "null", "off"):
        return None
    parts = text.split(",")
    if len(parts) != 2:
        raise ValueError("expected auto, none, or G,W (group size, window)")
    return se.SelfExtend(int(parts[0]), int(parts[1]))


_ARGS: dict[str, Callable[[Any], Any]] = {
    "model": str, "num_replicas": _int, "threads": _optional_int, "model_name": str,
    "self_extend": _self_extend, "device": str, "dtype": _dtype, "kv_cache": _dtype, "max_batch": _int,
    "max_queue": _int,
    "kv_budget": _optional_int, "prefill_tokens_per_step": _int, "name": str,
}

