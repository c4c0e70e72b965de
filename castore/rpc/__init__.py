"""gRPC adapters: protobuf <-> domain. The only package that imports grpc or castore._proto."""
