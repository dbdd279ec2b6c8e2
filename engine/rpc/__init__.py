"""The worker's gRPC schema (worker.proto and its generated modules) and the channel
options both ends use. Light on purpose: the router imports this package, and it must not
pull in torch (an import of ~1.5 s and ~180k objects that every full GC walks)."""

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]
