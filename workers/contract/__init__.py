"""The contract between the controller and its workers: everything the two processes agree on.

  * `messages`: the msgspec messages of the channel, both directions (and `ModelSpec`, a model as a
    worker hosts it);
  * `config`: `WorkerConfig`, the worker's whole configuration, sent once when it connects;
  * `sizing`: a model's shape, dtype and bytes (weights, KV per token) from its Hugging Face config;
  * `prepare`: weight sources prepared into local directories, in a child process;
  * `logs`, `gc_heap`: the log format (request-scoped fields shared by both processes' lines) and the
    garbage-collection statistics every process reports (`GcStats`).

The controller imports this package and nothing else of `workers/` or `memory/`
(tests/controller/test_boundaries.py), and none of it imports torch: the controller process runs
without it.
"""
