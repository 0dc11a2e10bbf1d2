"""The lightweight-kernel side of a rank: arena memory, scheduler and runtime."""
