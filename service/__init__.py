"""The style-recognition web service: a FastAPI app around one loaded model (:class:`predictor.BatchedModel`).

``serve.py`` is the command line; programs embed it with::

    from predictor import load_model_bundle
    from service import Settings, create_app

    app = create_app(load_model_bundle("runs/artists"), Settings(max_batch=16))   # any ASGI server runs it

    source = Source("runs/artists", gallery="gallery")      # reloadable, with a gallery it may change
    model, gallery, _ = source.load()
    app = create_app(model, Settings(), gallery, source)

Requests arriving together are batched into one model call (:mod:`service.batcher`); uploads are checked against
the :class:`Settings` limits and decoded off the event loop by the project's one image loader (:mod:`service.limits`).
"""

from service.app import create_app
from service.runtime import Source
from service.settings import Settings

__all__ = ["Settings", "Source", "create_app"]
