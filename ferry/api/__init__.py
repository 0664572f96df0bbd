"""The Python API: ``Relay``, its results and hooks (``relay``); the seed functions (``seed``)."""
