"""The engine: pure scheduling and KV bookkeeping, plus the torch model runner."""
