"""Generated protobuf/gRPC code for proto/*.proto: regenerate with `make proto`, never edit."""
