"""The runner: a child process that hosts exactly one model's Session, and the server's handle on it.

Why a process: a segfault in a native library (wrong runtime version, vendor bugs) costs one request,
not the daemon; unloading is process exit, which returns all native memory; and the per-token
callback work never competes with the HTTP event loop for the GIL.

One job per module:
- `messages.py`: every frame of the pipe protocol as a typed value (requests and replies);
- `codec.py`: the one encoder/decoder of frames, used by both processes;
- `dispatcher.py`: the child's handling of requests over one Session (`make_runtime` picks the engine);
- `child.py`, `__main__.py`: the child process's main loop over its pipes;
- `protocol.py`: what the server relies on (`Runner`, `Generation`, `RunnerFactory`, `Piece`,
  `Finished`, `RunnerDied`);
- `client.py`: the server side of the conversation (ids, waiting requests, generations);
- `process.py`: `RunnerProcess`, a client whose other end is a child process, and its factory.

The scheduler only knows `protocol.py`; the daemon gives it `process_runner_factory`, and tests may give
it a runner that runs the same dispatcher in the test process (tests/support/inprocess_runner.py).
"""
