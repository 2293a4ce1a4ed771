"""The search service: FastAPI app, collection (index + journal + model + images), server.

``dpq serve --index PATH [--model DIR] [--images SOURCE]`` runs :func:`serve`; the web page
is at ``/`` and the API description at ``/docs``. Needs the ``serve`` extra (FastAPI,
uvicorn, prometheus-client, python-multipart).
"""

from dpq.serve.app import create_app
from dpq.serve.collection import Collection, open_collection
from dpq.serve.server import running, serve

__all__ = ["Collection", "create_app", "open_collection", "running", "serve"]
