"""`gpt2load serve`: an OpenAI-compatible HTTP server with continuous batching, and a page to try the model.

Needs the `serve` extra (FastAPI and uvicorn); without it, `serve` raises a Gpt2LoadError that says so.
"""

from ..errors import Gpt2LoadError

try:
    from .app import create_app
    from .run import serve
except ModuleNotFoundError as e:
    if e.name not in ("fastapi", "uvicorn", "starlette"):
        raise
    _missing = e.name

    def serve(*args, **kwargs) -> None:  # type: ignore[misc]
        raise Gpt2LoadError(f"gpt2load serve needs {_missing}: pip install 'gpt2load[serve]'")

    create_app = None  # type: ignore[assignment]

__all__ = ["create_app", "serve"]
