"""The OpenAI-compatible server (``scripts/serve.py``): the app and its model (``app``), request
validation (``requests``) and the batcher (``batching``).

    served = load_served_model("~/.cache/kto_jax/smollm2-135m-instruct")   # or "tiny-1m", "orbax:RUN@STEP"
    server = make_server(served, host="127.0.0.1", port=8000)
    server.serve_forever()
"""

from kto_jax.serve.app import ServedModel, load_served_model, make_server, warm_up

__all__ = ["ServedModel", "load_served_model", "make_server", "warm_up"]
