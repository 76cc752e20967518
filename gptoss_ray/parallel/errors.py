"""Errors of the expert-parallel worker group, importable without Ray or torch."""


class WorkerGroupError(RuntimeError):
    """A worker died, hung past the step timeout, or failed a step.

    Raised by `WorkerGroup.step()` / `health_check()` (so by the engine's RayExecutor) after
    the whole group has been torn down: every sequence held by the workers (its KV cache,
    its sampler state) is lost. The engine ends those requests with finish_reason "error",
    forgets what it knew of the workers' caches (block tables, prefix-cache entries), and
    carries on: the next `execute()` builds a fresh group."""
