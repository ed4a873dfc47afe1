"""`clipper serve`: an HTTP service (FastAPI + uvicorn, extra `serve`) for embeddings in the
OpenAI shape, zero-shot labels, captions and search (or, for a vision-language model, chat
completions in OpenAI's shape: `chat`), plus a demo page at `/`, Prometheus metrics
at `/metrics` and the OpenAPI document at `/openapi.json` (browsable at `/docs`). Bodies are JSON,
or multipart/form-data where images are uploaded as files.

Requests from concurrent clients are batched: each kind of model call (text embedding, image
embedding) has one worker thread that takes whatever is queued, up to `max_batch` items, and runs
it as one forward pass. Inputs are checked against `Limits` before they reach the model; a bad
request gets a 4xx with a one-line reason and the server goes on serving.

The parts, in the order a request meets them: `guard` (the connection and admission, before
any body is read), `body` (the body read within bounds and parsed; `multipart`), `service` (the
checks of each endpoint's fields against `config.Limits`, the batchers and the model), `app` (the
FastAPI routes and uvicorn); `schema` describes the bodies for /openapi.json; `testing` runs a
server in a thread for tests and benchmarks.
"""
