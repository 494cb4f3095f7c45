"""Control-plane wire format: versioned msgpack messages and the zmq channels that carry them."""
