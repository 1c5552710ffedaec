"""An OpenAI-compatible HTTP server for XLab models (``xlab-serve CHECKPOINT``; needs the ``serve`` extra).

- ``protocol``: the request models (validated by pydantic) and OpenAI-style errors.
- ``chat``: ``render_chat``, a chat's messages as prompt ids (the one place that knows chat templates).
- ``text``: a choice's text as its tokens come: whole characters only, stop strings cut and never sent.
- ``engine``: one worker thread that owns the model and generates every request's rows together
  (``xlabml.inference.GenerationBatch``: rows join and leave between decode steps).
- ``app``: the FastAPI application (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health``).
- ``cli``: the ``xlab-serve`` command.
"""
