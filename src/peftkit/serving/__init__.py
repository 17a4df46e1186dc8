"""``peftkit serve``: an HTTP API and a web page over many adapters of one base.

- :mod:`.app`: the FastAPI app (:func:`~.app.create_app`) and :func:`~.app.serve`, which loads
  the adapters, binds the port and runs the HTTP side on a thread and the model on the main one;
- :mod:`.protocol`: what the requests may say and the answers' shapes (OpenAI's);
- :mod:`.workers`: limits, errors, metrics, the adapter store and the workers that batch;
- :mod:`.page`: the page at ``/`` (``page.html``) and the runs it shows.

Imported by the ``serve`` command only: FastAPI and uvicorn load with it.
"""
