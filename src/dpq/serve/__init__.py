"""The search service: FastAPI app, collection (index + journal + model + images), server.

``dpq serve --index PATH [--model DIR] [--images SOURCE]`` runs :func:`serve`; the web page
is at ``/`` and the API description at ``/docs``. From Python,
``create_app(ServeSettings(index=PATH, model=DIR, images=SOURCE))`` is the FastAPI app.
Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client, python-multipart).
"""

from dpq.serve.app import create_app
from dpq.serve.collection import Collection, open_collection
from dpq.serve.server import running, serve
from dpq.serve.settings import ServeSettings

__all__ = ["Collection", "ServeSettings", "create_app", "open_collection", "running", "serve"]
