"""torch + TorchRec: batches, shared blocks, input encoders, rankers, training, registry."""
