"""The training loop, its hook context and the replay buffer."""
