"""Control-plane wire format: every message type (one id table, `registry`), the versioned
msgpack codec and the zmq channels that carry them."""

from engine.protocol import registry as _registry  # noqa: F401  (registers every type id)
