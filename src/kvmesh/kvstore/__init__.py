"""The KV hierarchy below the device: host DRAM and local disk tiers, and the store."""
