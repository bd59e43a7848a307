"""Test support that ships with the package, like ``numpy.testing`` or ``transformers.testing_utils``.

- :mod:`arbiter.testing.fakes`: a scripted fake engine and tokenizer, linear and random heads, an in-process
  server thread and a subprocess server on the loopback interface.
- :mod:`arbiter.testing.served`: the app served with a fake engine (in process, or ``python -m
  arbiter.testing.served`` as a subprocess), the OpenAI error-shape assertion and one polling ``wait_until``.
- :mod:`arbiter.testing.fuzz`: the schemathesis fuzzer of a live server (needs ``schemathesis``).

The repository's tests and benchmarks import these; the library itself never does (tests/test_boundaries.py).
"""
