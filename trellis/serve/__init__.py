"""An OpenAI-compatible HTTP server: concurrent clients share one engine and its prefix cache.

``create_app`` builds the FastAPI app around a loaded model (tests and embedding); ``serve`` runs
it with uvicorn (``trellis serve``). See docs/serving.md.
"""

from trellis.serve.app import create_app
from trellis.serve.config import ServeConfig
from trellis.serve.server import serve

__all__ = ["ServeConfig", "create_app", "serve"]
