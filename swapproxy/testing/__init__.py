"""
What swapproxy's tests, its benchmark (``bench/``) and its scripts share, as treq ships
``treq.testing``; swapproxy itself imports nothing from here.

- `swapproxy.testing.local`: loopback, free ports, the paths of a source checkout (``twistd``,
  ``tests/fake_upstream.py``) and model commands that run the fake upstream.
- `swapproxy.testing.llama`: a real ``llama-server`` (found, never built) and tiny models for it.
- `swapproxy.testing.upstreams`: `ScriptedUpstreams`, the `Upstream` stand-ins a `Supervisor`
  runs when a test (or the swap simulation) says when each start, stop and exit happens.

The tests' own support (harnesses, fake reactors, raw HTTP clients, process helpers) is in
``tests/support/``.
"""
