"""Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models).

    python scripts/serve.py --model ~/.cache/kto_jax/smollm2-135m-instruct --port 8000
    python scripts/serve.py --model orbax:runs/kto@400 --api_key secret --max_batch 16
    python scripts/serve.py --model tiny-1m --port 0          # a random preset; port 0: any free port

--model: a preset name, a Hugging Face folder, or orbax:WORKDIR[@STEP]. Prints one line,
"serving NAME on http://HOST:PORT/v1", once the first shape is compiled; quiet otherwise
(pass --verbosity=0 for the library's logs and one line per request). See docs/serving.md for the
request fields (streaming, log-probs, echo), the errors, and evaluating a run with lm-eval;
kto_jax/serve/batching.py for the batching.
"""

from __future__ import annotations

from absl import app, flags, logging

from kto_jax.serve import load_served_model, make_server, warm_up

_MODEL = flags.DEFINE_string("model", None, "A preset name, a Hugging Face model folder, or orbax:WORKDIR[@STEP].")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on; 0 picks a free one (printed).")
_CHAT_TEMPLATE = flags.DEFINE_string(
    "chat_template",
    "auto",
    "halos, hh, plain, tokenizer (the model folder's), or auto (an orbax run's own; else the "
    "folder's when it has one; else halos).",
)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "", "A tokenizer folder or 'bytes' (default: the model's; bytes for a preset)."
)
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Most rows (prompts x n) per generate call; a power of two.")
_BATCH_WAIT_MS = flags.DEFINE_float(
    "batch_wait_ms", 5.0, "How long the batcher waits for more requests after the first."
)
_SERVED_NAME = flags.DEFINE_string(
    "served_name", "", "The model name in /v1/models and answers (default: from --model)."
)
_API_KEY = flags.DEFINE_string("api_key", "", "If set, requests need 'Authorization: Bearer KEY' (else 401).")
_DTYPE = flags.DEFINE_string(
    "dtype", "", "Params and activations dtype (float32, bfloat16); default float32, or an orbax run's own."
)
_MAX_TOKENS = flags.DEFINE_integer(
    "default_max_tokens", 256, "max_tokens of requests that set none (lowered to fit the context)."
)
_CONTEXT = flags.DEFINE_integer(
    "context_length", 0, "Tokens of prompt + completion allowed (0: the model's max_position_embeddings)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Random init seed of a preset.")
flags.mark_flag_as_required("model")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if _MAX_BATCH.value < 1 or _MAX_BATCH.value & (_MAX_BATCH.value - 1):
        raise app.UsageError(f"--max_batch must be a power of two; got {_MAX_BATCH.value}")
    served = load_served_model(
        _MODEL.value,
        chat_template=_CHAT_TEMPLATE.value,
        tokenizer=_TOKENIZER.value,
        dtype=_DTYPE.value,
        name=_SERVED_NAME.value,
        seed=_SEED.value,
        context_length=_CONTEXT.value,
    )
    server = make_server(
        served,
        host=_HOST.value,
        port=_PORT.value,
        max_batch=_MAX_BATCH.value,
        wait_ms=_BATCH_WAIT_MS.value,
        api_key=_API_KEY.value,
        default_max_tokens=_MAX_TOKENS.value,
    )
    warm_up(server.app)
    host, port = server.server_address[:2]
    print(f"serving {served.name} on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    app.run(main)
