"""
What the tests share, one module an idea; no test module imports another test module.

- `tests.support.harness`: swapproxy's Resource tree over a real `Supervisor` with in-memory
  upstreams (`MemoryUpstream`), and a treq client: the default way to test a route.
- `tests.support.processharness`: swapproxy's Site over real `Upstream` objects whose children
  are fake processes, for what depends on the start itself (loading streams, progress, the board).
- `tests.support.rawhttp`: `RawConnection`, the one raw HTTP/1.1 client connection to
  swapproxy's Site over a `StringTransport`, and parsers for what comes back (responses,
  chunks, SSE events).
- `tests.support.reactors`: fake reactors: `ProcessReactor` (its children are `FakeProcess`es the
  test prints from and ends), `ThreadedMemoryReactor`.
- `tests.support.doubles`: stand-ins for a peer's client and for llama-server's slot API.
- `tests.support.live`: swapproxy served by this process on loopback, with real clients (treq,
  openai, and `LoopbackClient` for raw bytes).
- `tests.support.processes`: real child processes (alive, frozen, killed), and ``twistd
  swapproxy`` as one.
- `tests.support.llama`: the real llama-server of this run and its tiny models.
- `tests.support.differential`: the same request sent to a real llama-server and to swapproxy.
- `tests.support.browser`: a headless Chromium for the dashboard.

What the benchmark and the scripts share with the tests (loopback ports, the fake upstream's
command, llama-server and tiny models, the supervisor's scripted upstreams) is in
`swapproxy.testing`.
"""
