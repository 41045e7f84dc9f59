"""The OpenAI-compatible server (``scripts/serve.py``; docs/serving.md): the app and its model (``app``),
the HTTP handler (``handler``), request validation (``requests``), the batcher (``batching``), the
chunked generation (``engine``), log-probs (``scoring``), answer bodies (``responses``) and
server-sent events (``streaming``).

    served = load_served_model("~/.cache/kto_jax/smollm2-135m-instruct")   # or "tiny-1m", "orbax:RUN@STEP"
    server = make_server(served, host="127.0.0.1", port=8000)
    server.serve_forever()
"""

from kto_jax.serve.app import ServedModel, load_served_model, make_server, warm_up

__all__ = ["ServedModel", "load_served_model", "make_server", "warm_up"]
