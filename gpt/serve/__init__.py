"""python -m gpt.serve: an OpenAI-compatible HTTP server for a checkpoint, with a web page.

The modules, each importing only the ones listed before it:

- `protocol`: the completions API's requests (checked field by field), answers, stream chunks and errors,
  as JSON values; no web framework.
- `service`: the bridge between the asyncio server and the engine's thread (gpt/generation/engine.py):
  one asyncio queue per HTTP request, cancellation when its client leaves, the drain on shutdown.
- `app`: the Starlette application: the routes, body limits, error responses and the web page (gpt/web/).
- `server`: uvicorn's server with this project's signal handling (Ctrl-C/SIGTERM drain, exit status 0).
- `__main__`: the command line: load the model, build the engine, serve.

Starlette and uvicorn are optional packages (`pip install -e ".[serve]"`); this package's `__init__` imports
none of them, and the command line checks for them before it imports `app` and `server`.
"""
