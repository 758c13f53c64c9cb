"""An OpenAI-compatible server for many adapters on one frozen base, with continuous batching and a web page.

    server = Server.load(ServeConfig(model=..., adapters={"name": "adapter_dir"}))
    app = create_app(server)  # FastAPI; run it with uvicorn (`llama-adapter serve` does)
"""

from .app import create_app
from .config import ServeConfig
from .server import Server

__all__ = ["ServeConfig", "Server", "create_app"]
